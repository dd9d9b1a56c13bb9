"""The model runtime shared by every worker: a Llama-family decoder, KV ownership, loading, sampling.

Names resolve lazily so that importing `services.engine.cli` (every `tandem` call) does not load torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ModelConfig": "services.engine.config",
    "Engine": "services.engine.engine",
    "model_fingerprint": "services.engine.engine",
    "random_engine": "services.engine.engine",
    "KVBuffer": "services.engine.kv",
    "default_model_path": "services.engine.loader",
    "load_engine": "services.engine.loader",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'services.engine' has no attribute {name!r}")
