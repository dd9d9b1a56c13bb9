"""Engine-area fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def tiny_engine(tiny_checkpoint: Path):
    """The shared `tiny_checkpoint` loaded on the CPU."""
    from services.engine import load_engine

    return load_engine(tiny_checkpoint, device="cpu")
