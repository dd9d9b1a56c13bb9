"""Cluster-area fixtures: `tandem up` of real layouts, and the tiny model they serve."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
from kit.cluster import start_roles


@pytest.fixture(scope="session")
def tiny_checkpoint_4k(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny random Llama with a 4096-token context, so a request can outlive the time a test needs to
    disconnect it."""
    from kit.checkpoints import tiny_config, write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", tiny_config(max_seq_len=4096))


@pytest.fixture(scope="module")
def tiny_engine_4k(tiny_checkpoint_4k: Path):
    """`tiny_checkpoint_4k` loaded in this process on the CPU."""
    from services.engine.loader import load_engine

    return load_engine(str(tiny_checkpoint_4k), device="cpu")


@pytest.fixture(scope="module")
def split_cluster(tiny_checkpoint_4k: Path, tmp_path_factory: pytest.TempPathFactory):
    """`tandem up` of the tiny model: one prefill and two decode workers."""
    up = start_roles(tmp_path_factory.mktemp("split"), str(tiny_checkpoint_4k), ["prefill", "decode", "decode"],
                     "tiny-split")
    yield up
    up.stop(signal.SIGKILL if up.proc.poll() is None else signal.SIGTERM)


@pytest.fixture(scope="module")
def mixed_cluster(tiny_checkpoint_4k: Path, tmp_path_factory: pytest.TempPathFactory):
    """`tandem up` of the tiny model: one mixed worker."""
    up = start_roles(tmp_path_factory.mktemp("mixed"), str(tiny_checkpoint_4k), ["mixed"], "tiny-mixed")
    yield up
    up.stop(signal.SIGTERM)


@pytest.fixture(scope="module")
def smol_split_cluster(smol_engine, tmp_path_factory: pytest.TempPathFactory):
    """`tandem up` of the embedded SmolLM2: one prefill and one decode worker (routing over two is covered by the
    tiny-model cluster; each process loads the model). Skipped with `smol_engine` where the model is missing."""
    up = start_roles(tmp_path_factory.mktemp("smol"), None, ["prefill", "decode"], "smol-split")
    yield up
    up.stop(signal.SIGTERM)
