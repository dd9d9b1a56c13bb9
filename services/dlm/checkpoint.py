"""Checkpoint files: config + tokenizer + half-precision weights in one torch file, verified by sha256."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from services.contracts.errors import InvalidArgument
from services.dlm.layers import DLMConfig
from services.dlm.tokenizer import CharTokenizer

CHECKPOINT_DIR = Path(__file__).resolve().parent / "checkpoints"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def save(model: torch.nn.Module, tok: CharTokenizer, path: Path, meta: dict | None = None) -> str:
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    kind = type(model).__name__
    torch.save({"kind": kind, "config": model.cfg.to_dict(), "tokenizer": tok.to_dict(), "meta": meta or {},
                "state": state}, path)
    digest = sha256(path)
    path.with_suffix(".sha256").write_text(f"{digest}  {path.name}\n")
    return digest


def load(path: Path, device: str = "cpu", dtype: torch.dtype = torch.float32,
         ) -> tuple[torch.nn.Module, CharTokenizer, dict]:
    """Refuses a file whose sha256 differs from the one recorded next to it."""
    from services.dlm.guide import ARGuide
    from services.dlm.model import DiffusionLM

    path = Path(path)
    if not path.exists():
        raise InvalidArgument(f"checkpoint: {path} does not exist", param="checkpoint")
    side = path.with_suffix(".sha256")
    if not side.exists():
        raise InvalidArgument(f"checkpoint: {side} with the expected sha256 is missing", param="checkpoint")
    want, got = side.read_text().split()[0], sha256(path)
    if want != got:
        raise InvalidArgument(f"checkpoint: sha256 of {path.name} is {got}, expected {want}", param="checkpoint")
    blob = torch.load(path, map_location="cpu", weights_only=True)
    cls = {"DiffusionLM": DiffusionLM, "ARGuide": ARGuide}[blob["kind"]]
    model = cls(DLMConfig(**blob["config"]))
    model.load_state_dict({k: v.float() for k, v in blob["state"].items()})
    return model.to(device=device, dtype=dtype).eval(), CharTokenizer.from_dict(blob["tokenizer"]), blob["meta"]

def load_pair(ckpt_dir: Path = CHECKPOINT_DIR, device: str = "cpu", dlm_path: Path | None = None):
    dlm, tok, _ = load(dlm_path or ckpt_dir / "dlm.pt", device)
    guide, gtok, _ = load(ckpt_dir / "guide.pt", device)
    if gtok != tok:
        raise InvalidArgument(f"guide: tokenizer {gtok.name} does not match the DLM's {tok.name}", param="guide")
    return dlm, guide, tok
