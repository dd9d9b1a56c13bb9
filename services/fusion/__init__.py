"""Flover temporal fusion: a decode scheduler that fuses every live request into one step per iteration.

Names resolve lazily so that `tandem --help` (which imports services.fusion.cli) does not load torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "NO_TOKEN": "services.fusion.request",
    "DecodeRequest": "services.fusion.request",
    "POLICIES": "services.fusion.scheduler",
    "FusionScheduler": "services.fusion.scheduler",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'services.fusion' has no attribute {name!r}")
