"""Text <-> token ids over the `tokenizers` library: from tokenizer.json or GGUF metadata, with chat templates."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders as tk_decoders
from tokenizers import models as tk_models

from services.contracts.errors import InvalidArgument

# GGUF token types (llama.cpp's llama_token_type)
_CONTROL, _USER_DEFINED = 3, 4
# llama.cpp pre-tokenizer names whose regex splits digits one by one before the GPT-2 split.
_SINGLE_DIGIT_PRE = {"smollm"}
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")


class Tokenizer:
    """encode/decode, streaming detokenization, EOS ids and a jinja2 chat template."""

    def __init__(self, backend: HFTokenizer, *, bos_id: int | None = None, eos_ids: Sequence[int] = (),
                 add_bos: bool = False, chat_template: str | None = None,
                 bos_token: str = "", eos_token: str = "") -> None:
        self.backend = backend
        self.bos_id = bos_id
        self.eos_ids = tuple(dict.fromkeys(eos_ids))
        self.add_bos = add_bos
        self.chat_template = chat_template
        self.bos_token, self.eos_token = bos_token, eos_token
        self._template = None

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self.backend.encode(text, add_special_tokens=add_special_tokens).ids
        # tokenizer.json usually adds BOS through its post-processor; GGUF metadata says so with add_bos_token.
        if add_special_tokens and self.add_bos and self.bos_id is not None and (not ids or ids[0] != self.bos_id):
            ids = [self.bos_id, *ids]
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def stream(self, skip_special_tokens: bool = True) -> StreamDecoder:
        return StreamDecoder(self, skip_special_tokens)

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        """Render `messages` ([{role, content}]) with the checkpoint's template (ChatML when it has none)."""
        if not isinstance(messages, list) or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages):
            raise InvalidArgument("messages must be a list of {role: str, content: str}", param="messages")
        if self._template is None:
            self._template = _compile_template(self.chat_template or _CHATML)
        return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                     bos_token=self.bos_token, eos_token=self.eos_token)

    def encode_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> list[int]:
        # The rendered text carries its own special tokens (BOS included when the template writes it).
        return self.encode(self.apply_chat_template(messages, add_generation_prompt), add_special_tokens=False)

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """A Hugging Face directory: tokenizer.json, plus tokenizer_config.json for template and special tokens."""
        path = Path(path)
        try:
            backend = HFTokenizer.from_file(str(path / "tokenizer.json"))
        except Exception as exc:  # the tokenizers error type is not exported; report it whatever it is
            raise InvalidArgument(f"cannot read {path / 'tokenizer.json'}: {exc}", param="model") from exc
        tc = _read_json(path / "tokenizer_config.json")
        cfg = _read_json(path / "config.json")
        gen = _read_json(path / "generation_config.json")
        bos_token, eos_token = _token_str(tc.get("bos_token")), _token_str(tc.get("eos_token"))
        eos: list[int] = []
        for source in (gen.get("eos_token_id"), cfg.get("eos_token_id")):
            eos += source if isinstance(source, list) else [source] if isinstance(source, int) else []
        if eos_token and backend.token_to_id(eos_token) is not None:
            eos.append(backend.token_to_id(eos_token))
        bos_id = cfg.get("bos_token_id")
        if bos_id is None and bos_token:
            bos_id = backend.token_to_id(bos_token)
        template = tc.get("chat_template")
        if isinstance(template, list):  # several named templates: take the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        return cls(backend, bos_id=bos_id, eos_ids=eos, add_bos=False, chat_template=template,
                   bos_token=bos_token, eos_token=eos_token)

    @classmethod
    def from_gguf(cls, fields: dict[str, Any]) -> Tokenizer:
        """Build from GGUF metadata (already decoded to Python values): tokens, merges, token types, bos/eos."""
        kind = fields.get("tokenizer.ggml.model")
        if kind != "gpt2":
            raise InvalidArgument(f"GGUF tokenizer model {kind!r} is not supported (supported: gpt2 byte-level BPE)",
                                  param="model")
        tokens: list[str] = list(fields["tokenizer.ggml.tokens"])
        types: list[int] = list(fields.get("tokenizer.ggml.token_type") or [1] * len(tokens))
        merges = [tuple(m.split(" ", 1)) for m in fields.get("tokenizer.ggml.merges", [])]
        vocab = {t: i for i, t in enumerate(tokens)}
        backend = HFTokenizer(tk_models.BPE(vocab, merges, fuse_unk=False, byte_fallback=False))
        prefix_space = bool(fields.get("tokenizer.ggml.add_space_prefix"))
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=prefix_space, use_regex=True)
        pre = fields.get("tokenizer.ggml.pre")
        if pre in _SINGLE_DIGIT_PRE:
            digits = pre_tokenizers.Split(Regex(r"\p{N}"), behavior="isolated")
            backend.pre_tokenizer = pre_tokenizers.Sequence([digits, byte_level])
        elif pre == "llama-bpe":  # Llama 3's split replaces GPT-2's (numbers in groups of up to 3 digits)
            split = pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated")
            byte_level = pre_tokenizers.ByteLevel(add_prefix_space=prefix_space, use_regex=False)
            backend.pre_tokenizer = pre_tokenizers.Sequence([split, byte_level])
        else:
            backend.pre_tokenizer = byte_level
        backend.decoder = tk_decoders.ByteLevel()
        special = [AddedToken(t, special=types[i] == _CONTROL, normalized=False)
                   for i, t in enumerate(tokens) if types[i] in (_CONTROL, _USER_DEFINED)]
        backend.add_tokens(special)
        bos_id = fields.get("tokenizer.ggml.bos_token_id")
        eos = [fields[k] for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id") if k in fields]
        return cls(backend, bos_id=bos_id, eos_ids=eos, add_bos=bool(fields.get("tokenizer.ggml.add_bos_token")),
                   chat_template=fields.get("tokenizer.chat_template"),
                   bos_token=tokens[bos_id] if bos_id is not None else "",
                   eos_token=tokens[eos[0]] if eos else "")


class StreamDecoder:
    """Incremental detokenization: text deltas whose concatenation equals decoding all ids at once.

    Byte-level BPE splits multi-byte characters across tokens, so a delta is released only once the
    decoded tail no longer ends in a replacement character; a small window keeps each step O(1).
    """

    __slots__ = ("tok", "skip", "ids", "prefix", "read")

    def __init__(self, tok: Tokenizer, skip_special_tokens: bool = True) -> None:
        self.tok, self.skip = tok, skip_special_tokens
        self.ids: list[int] = []
        self.prefix = self.read = 0  # ids[prefix:read] is the already released context window

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        before = self.tok.decode(self.ids[self.prefix:self.read], self.skip)
        now = self.tok.decode(self.ids[self.prefix:], self.skip)
        if len(now) > len(before) and not now.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return now[len(before):]
        return ""

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character at the very end)."""
        before = self.tok.decode(self.ids[self.prefix:self.read], self.skip)
        now = self.tok.decode(self.ids[self.prefix:], self.skip)
        self.prefix = self.read = len(self.ids)
        return now[len(before):]


_CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
           "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def _compile_template(source: str) -> Any:
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise InvalidArgument(f"chat template: {message}", param="messages")

    def strftime_now(fmt: str) -> str:
        import datetime

        return datetime.datetime.now().strftime(fmt)

    # Same environment settings as Hugging Face's renderer, so templates written for it behave alike.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now)
    env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
    try:
        return env.from_string(source)
    except TemplateError as exc:
        raise InvalidArgument(f"chat template does not compile: {exc}", param="chat_template") from exc


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InvalidArgument(f"cannot read {path}: {exc}", param="model") from exc
    return data if isinstance(data, dict) else {}


def _token_str(value: Any) -> str:
    if isinstance(value, dict):  # serialized AddedToken
        return str(value.get("content", ""))
    return value if isinstance(value, str) else ""
