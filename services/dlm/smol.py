"""The tokenizer bridge for a DLM on SmolLM2's tokenizer: the sampler sees SmolLM2 ids (+ [MASK] one past
the vocabulary); inside, the DLM embeds a compact table of only the ids its corpus uses (small checkpoint)."""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn

from services.contracts.errors import InvalidArgument
from services.dlm.checkpoint import CHECKPOINT_DIR, sha256
from services.dlm.layers import DLMConfig
from services.dlm.model import DiffusionLM, WindowKV
from services.dlm.smol_tasks import GEN_LEN, PROMPT_LEN, TextExample, make_example, response_text

SMOL_CHECKPOINT = CHECKPOINT_DIR / "dlm_smollm2.pt"


@lru_cache(maxsize=1)
def smol_tokenizer():  # -> services.engine.tokenizer.Tokenizer
    """SmolLM2's tokenizer from the installed GGUF's metadata, without dequantizing the weights."""
    from gguf import GGUFReader

    from services.engine.gguf_file import read_fields
    from services.engine.loader import default_model_path
    from services.engine.tokenizer import Tokenizer

    return Tokenizer.from_gguf(read_fields(GGUFReader(str(default_model_path()))))


def tokenizer_fingerprint(tok) -> str:
    """Identity of a vocabulary: two tokenizers with the same token -> id table share it."""
    vocab = tok.backend.get_vocab(with_added_tokens=True)
    return "smollm2:" + hashlib.sha256(json.dumps(sorted(vocab.items())).encode()).hexdigest()[:16]


@dataclass(frozen=True, slots=True)
class SmolBridge:
    """`ids[i]` is the SmolLM2 id of compact id i; compact id len(ids) is [MASK]. The sequence in the
    sampler holds SmolLM2 ids: pad `<|endoftext|>`, answers end with "\\n" (the sampler's EOS)."""

    ids: tuple[int, ...]
    fingerprint: str
    vocab_size: int = 49152
    pad_id: int = 0
    eos_id: int = 198

    @property
    def mask_id(self) -> int:
        return self.vocab_size  # one past SmolLM2's vocabulary: the guide never sees it

    @property
    def compact_size(self) -> int:
        return len(self.ids) + 1

    def to_dict(self) -> dict:
        return {"name": "smollm2-remap", "ids": list(self.ids), "fingerprint": self.fingerprint,
                "vocab_size": self.vocab_size, "pad_id": self.pad_id, "eos_id": self.eos_id}

    @classmethod
    def from_dict(cls, d: dict) -> SmolBridge:
        return cls(tuple(d["ids"]), d["fingerprint"], d["vocab_size"], d["pad_id"], d["eos_id"])

    @classmethod
    def build(cls, tok, n: int = 4000, seed: int = 4242) -> SmolBridge:
        """Collect every id the corpus produces (plus pad and EOS) from a sample of examples."""
        rng, seen = random.Random(seed), set()
        for _ in range(n):
            ex = make_example(rng)
            seen.update(tok.encode(ex.prompt + response_text(ex), add_special_tokens=False))
        b = cls((), tokenizer_fingerprint(tok), tok.vocab_size)
        return replace(b, ids=tuple(sorted(seen | {b.pad_id, b.eos_id})))

    def encode_prompt(self, tok, prompt: str, prompt_len: int = PROMPT_LEN) -> list[int]:
        ids = tok.encode(prompt, add_special_tokens=False)
        if not ids:
            raise InvalidArgument("prompt: must not be empty", param="prompt")
        if len(ids) > prompt_len:
            raise InvalidArgument(f"prompt: {len(ids)} tokens, the model takes at most {prompt_len}", param="prompt")
        known = set(self.ids)
        bad = [t for t in ids if t not in known]
        if bad:
            raise InvalidArgument(f"prompt: token {tok.decode([bad[0]])!r} (id {bad[0]}) is not in the diffusion "
                                  "model's vocabulary", param="prompt")
        return [self.pad_id] * (prompt_len - len(ids)) + ids

    def encode_example(self, tok, ex: TextExample) -> list[int]:
        ans = tok.encode(response_text(ex), add_special_tokens=False)
        return self.encode_prompt(tok, ex.prompt) + ans + [self.eos_id] * (GEN_LEN - len(ans))

    def decode(self, tok, ids: list[int]) -> str:
        """The answer: text up to the first newline, leading space dropped."""
        out = []
        for t in ids:
            if t == self.eos_id:
                break
            out.append(t)
        return tok.decode([t for t in out if t < self.vocab_size]).strip()


class RemappedDLM(nn.Module):
    """A DiffusionLM over compact ids behind SmolLM2 ids: inputs are looked up in the table, logits are
    scattered back to SmolLM2's vocabulary + [MASK] (ids outside the table and [MASK] itself get -inf)."""

    def __init__(self, inner: DiffusionLM, bridge: SmolBridge) -> None:
        super().__init__()
        if inner.cfg.vocab_size != bridge.compact_size:
            raise ValueError(f"DLM vocabulary {inner.cfg.vocab_size} != bridge table {bridge.compact_size}")
        self.inner, self.bridge = inner, bridge
        self.cfg = replace(inner.cfg, vocab_size=bridge.vocab_size + 1)
        self.vocab_name = bridge.fingerprint  # the sampler's tokenizer-compatibility check reads this
        to_compact = torch.full((bridge.vocab_size + 1,), -1, dtype=torch.long)
        to_compact[list(bridge.ids)] = torch.arange(len(bridge.ids))
        to_compact[bridge.mask_id] = len(bridge.ids)
        self.register_buffer("to_compact", to_compact, persistent=False)
        self.register_buffer("table", torch.tensor(bridge.ids, dtype=torch.long), persistent=False)

    @property
    def embed(self) -> nn.Embedding:  # the sampler reads the device and dtype from here
        return self.inner.embed

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.forward_window(ids, 0, None)

    def forward_window(self, window: torch.Tensor, start: int, store: WindowKV | None) -> torch.Tensor:
        c = self.to_compact[window]
        if bool((c < 0).any()):
            raise InvalidArgument("prompt: a token outside the diffusion model's vocabulary", param="prompt")
        small = self.inner.forward_window(c, start, store)
        out = small.new_full(small.shape[:2] + (self.cfg.vocab_size,), float("-inf"))
        out[..., self.table] = small[..., :-1]  # the [MASK] column stays -inf: never drafted
        return out


def save(model: DiffusionLM, bridge: SmolBridge, path: Path, meta: dict | None = None) -> str:
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    torch.save({"kind": "SmolDiffusionLM", "config": model.cfg.to_dict(), "tokenizer": bridge.to_dict(),
                "meta": meta or {}, "state": state}, path)
    digest = sha256(path)
    path.with_suffix(".sha256").write_text(f"{digest}  {path.name}\n")
    return digest


def load(path: Path = SMOL_CHECKPOINT, device: str = "cpu") -> tuple[RemappedDLM, SmolBridge, dict]:
    """Refuses a file whose sha256 differs from the one recorded next to it."""
    path = Path(path)
    side = path.with_suffix(".sha256")
    if not path.exists() or not side.exists():
        raise InvalidArgument(f"checkpoint: {path} or its .sha256 does not exist", param="checkpoint")
    want, got = side.read_text().split()[0], sha256(path)
    if want != got:
        raise InvalidArgument(f"checkpoint: sha256 of {path.name} is {got}, expected {want}", param="checkpoint")
    blob = torch.load(path, map_location="cpu", weights_only=True)
    if blob.get("kind") != "SmolDiffusionLM":
        raise InvalidArgument(f"checkpoint: {path.name} is not a SmolLM2-tokenizer DLM", param="checkpoint")
    inner = DiffusionLM(DLMConfig(**blob["config"]))
    inner.load_state_dict({k: v.float() for k, v in blob["state"].items()})
    bridge = SmolBridge.from_dict(blob["tokenizer"])
    return RemappedDLM(inner.eval(), bridge).to(device).eval(), bridge, blob["meta"]
