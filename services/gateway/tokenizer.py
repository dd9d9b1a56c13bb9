"""The gateway's tokenizer: the engine's, loaded without the weights (GGUF metadata or tokenizer.json)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from services.contracts.errors import InvalidArgument, NotFound


def load_tokenizer(source: str | Path | None = None) -> Any:
    """services.engine's Tokenizer for a model source (None = the embedded SmolLM2), without loading weights."""
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
