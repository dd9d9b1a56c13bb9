"""Checkpoint files: weights (safetensors, fp16), config.json with the weights' sha256, schedules.json."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from services.contracts.errors import InvalidArgument
from services.policy.model import Denoiser, DenoiserConfig
from services.policy.sampler import Normalizer

DEFAULT_DIR = Path(__file__).resolve().parent / "checkpoints"
WEIGHTS, CONFIG, SCHEDULES = "policy.safetensors", "config.json", "schedules.json"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _write_safetensors(state: dict[str, torch.Tensor], path: Path) -> None:
    """The safetensors layout (u64 header size, JSON header, raw little-endian bytes), for hosts without the package."""
    header, blobs, offset = {}, [], 0
    for name in sorted(state):
        raw = state[name].numpy().tobytes()
        header[name] = {"dtype": "F16", "shape": list(state[name].shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    path.write_bytes(len(head).to_bytes(8, "little") + head + b"".join(blobs))


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    import numpy as np

    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    out = {}
    for name, h in header.items():
        if name == "__metadata__":
            continue
        if h["dtype"] != "F16":
            raise InvalidArgument(f"checkpoint: tensor {name} has dtype {h['dtype']}, expected F16", param="checkpoint")
        a, b = h["data_offsets"]
        out[name] = torch.from_numpy(np.frombuffer(data[8 + n + a:8 + n + b], np.float16).copy().reshape(h["shape"]))
    return out


def save(model: Denoiser, norm: Normalizer, out: Path, extra: dict | None = None) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu", torch.float16).contiguous() for k, v in model.state_dict().items()}
    try:
        from safetensors.torch import save_file
    except ImportError:  # the bare GPU box
        _write_safetensors(state, out / WEIGHTS)
    else:
        save_file(state, str(out / WEIGHTS))
    meta = {"model": model.cfg.to_dict(), "norm": norm.to_dict(), "sha256": sha256(out / WEIGHTS), **(extra or {})}
    (out / CONFIG).write_text(json.dumps(meta, indent=1))
    return out


def load(path: str | Path | None = None, device: str = "cpu") -> tuple[Denoiser, Normalizer, dict]:
    """Load and verify a checkpoint directory (default: the committed one); fp32 on every device."""
    d = Path(path) if path else DEFAULT_DIR
    if not (d / CONFIG).exists() or not (d / WEIGHTS).exists():
        raise InvalidArgument(f"checkpoint: no {CONFIG} and {WEIGHTS} in {d}", param="checkpoint")
    meta = json.loads((d / CONFIG).read_text())
    digest = sha256(d / WEIGHTS)
    if digest != meta["sha256"]:
        raise InvalidArgument(f"checkpoint: sha256 of {d / WEIGHTS} is {digest}, config says {meta['sha256']}",
                              param="checkpoint")
    model = Denoiser(DenoiserConfig(**meta["model"]))
    try:
        from safetensors.torch import load_file
    except ImportError:  # the bare GPU box
        raw = _read_safetensors(d / WEIGHTS)
    else:
        raw = load_file(str(d / WEIGHTS))
    state = {k: v.float() for k, v in raw.items()}
    model.load_state_dict(state)
    return model.to(device).eval(), Normalizer.from_dict(meta["norm"]), meta


def load_schedules(path: str | Path | None = None) -> dict:
    f = (Path(path) if path else DEFAULT_DIR) / SCHEDULES
    return json.loads(f.read_text()) if f.exists() else {}
