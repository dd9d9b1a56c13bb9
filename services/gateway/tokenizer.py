"""The gateway's tokenizer: the engine's, loaded without the weights (GGUF metadata or tokenizer.json)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from services.contracts.errors import InvalidArgument, NotFound


class _Silent:
    def push(self, token_id: int) -> str:
        return ""

    def flush(self) -> str:
        return ""


class IdsOnly:
    """The gateway's tokenizer for random weights (`model.path: random:...`): no vocabulary, so prompts come as
    token ids (gRPC `token_ids`, or an OpenAI `prompt` given as a list of ints) and answers carry ids, no text."""

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        raise InvalidArgument("prompt: this cluster serves random weights (model.path random:...), which have no "
                              "tokenizer; send token ids instead of text", param="prompt")

    def encode_chat(self, messages: list[Any], add_generation_prompt: bool = True) -> list[int]:
        raise InvalidArgument("messages: this cluster serves random weights (model.path random:...), which have no "
                              "tokenizer or chat template; send token ids to /v1/completions or gRPC Generate",
                              param="messages")

    def decode(self, ids: Any, skip_special_tokens: bool = False) -> str:
        return ""

    def stream(self, skip_special_tokens: bool = True) -> _Silent:
        return _Silent()


def load_tokenizer(source: str | Path | None = None) -> Any:
    """services.engine's Tokenizer for a model source (None = the embedded SmolLM2), without loading weights;
    for `random:...` weights, `IdsOnly` with the spec's vocabulary size."""
    if isinstance(source, str) and source.startswith("random:"):
        from services.workers.modelspec import random_config

        return IdsOnly(int(random_config(source)["vocab_size"]))
    from services.engine.loader import default_model_path
    from services.engine.tokenizer import Tokenizer

    path = default_model_path() if source is None else Path(source).expanduser()
    if not path.exists():
        raise NotFound(f"model path {str(path)!r} does not exist", param="model")
    if path.is_dir():
        if (path / "tokenizer.json").is_file():
            return Tokenizer.from_dir(path)
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) != 1:
            raise InvalidArgument(f"{path} has no tokenizer.json and not exactly one .gguf file", param="model")
        path = ggufs[0]
    if path.suffix != ".gguf":
        raise InvalidArgument(f"{str(path)!r} is neither a model directory nor a .gguf file", param="model")
    import gguf

    reader = gguf.GGUFReader(path)
    fields = {k: f.contents() for k, f in reader.fields.items() if k.startswith("tokenizer.")}
    return Tokenizer.from_gguf(fields)
