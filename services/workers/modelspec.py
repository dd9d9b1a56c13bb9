"""Model specs a worker can load in its own process: None (embedded default), a checkpoint path, or random:..."""

from __future__ import annotations

import json
from typing import Any

from services.contracts.errors import InvalidArgument

# A tiny Llama shape for tests and benchmarks: same spec in two processes -> same weights -> same fingerprint.
DTYPES = ("float32", "bfloat16", "float16")  # a random spec's optional "dtype" key
TINY = {"vocab_size": 256, "dim": 64, "n_layers": 4, "n_heads": 4, "n_kv_heads": 2, "hidden_dim": 128,
        "max_seq_len": 512, "eos_ids": [1]}


def random_spec(**cfg: Any) -> str:
    """The spec string for a random model with this config (keys of ModelConfig, plus optional "seed" and "dtype")."""
    return "random:" + json.dumps(cfg, sort_keys=True)


def random_config(spec: str) -> dict[str, Any]:
    """The config keys of a `random:` spec (ModelConfig's, plus optional "seed" and "dtype"): `random:tiny`,
    `random:<shape>` (a name in services/engine/shapes.py, e.g. random:llama-3.2-1b) or `random:<json>`."""
    from dataclasses import asdict

    from services.engine.shapes import SHAPES

    body = spec[len("random:"):]
    if body == "tiny":
        return dict(TINY)
    if body in SHAPES:
        return asdict(SHAPES[body])
    try:
        cfg = json.loads(body)
    except json.JSONDecodeError as exc:
        names = ", ".join(f"random:{n}" for n in SHAPES if n != "tiny")
        raise InvalidArgument(f"model spec {spec!r}: not 'random:tiny', {names} or 'random:<json>': {exc}",
                              param="model") from None
    if not isinstance(cfg, dict):
        raise InvalidArgument(f"model spec {spec!r}: the JSON must be an object", param="model")
    return cfg


def load_model(spec: str | None, device: str | None = None, dtype: str | None = None) -> Any:
    """An Engine for `spec`; InvalidArgument naming `model` when the spec cannot be read. `dtype` (float32,
    bfloat16, float16) overrides a random spec's own; None: the spec's, else bfloat16 on CUDA, float32 on CPU."""
    import torch

    from services.engine import ModelConfig, random_engine

    if dtype is not None and dtype not in DTYPES:
        raise InvalidArgument(f"dtype must be one of {', '.join(DTYPES)} (got {dtype!r})", param="dtype")
    if spec is None or not spec.startswith("random:"):
        from services.engine.loader import load_engine

        return load_engine(spec, device=device, dtype=getattr(torch, dtype) if dtype else None)
    cfg = random_config(spec)
    seed = cfg.pop("seed", 0)
    dtype = dtype or cfg.pop("dtype", None)
    cfg.pop("dtype", None)
    if dtype is not None and dtype not in DTYPES:
        raise InvalidArgument(f"model spec {spec!r}: dtype must be one of {', '.join(DTYPES)} (got {dtype!r})",
                              param="model")
    if "eos_ids" in cfg:
        cfg["eos_ids"] = tuple(cfg["eos_ids"])
    try:
        mc = ModelConfig(**cfg)
    except (TypeError, ValueError) as exc:
        raise InvalidArgument(f"model spec {spec!r}: {exc}", param="model") from None
    opts: dict[str, Any] = {"device": device} if device else {}
    if dtype:
        opts["dtype"] = getattr(torch, dtype)
    engine = random_engine(mc, seed=seed, **opts)
    engine.name = spec
    return engine
