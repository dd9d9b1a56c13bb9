"""Flover temporal fusion: a decode scheduler that fuses every live request into one step per iteration.

Names resolve lazily so that `tandem --help` (which imports services.bench.fusion_cli) does not load torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "NO_TOKEN": "services.batching.request",
    "DecodeRequest": "services.batching.request",
    "MODES": "services.batching.scheduler",
    "FusionScheduler": "services.batching.scheduler",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'services.batching' has no attribute {name!r}")
