"""Shared fixtures: free ports, a private real Redis, a tiny checkpoint, the SmolLM2 engine, GPU skipping, a quiet torch.

Each fixture is defined once; its name says what it is. Area-only fixtures live in tests/<area>/conftest.py,
helpers that are not fixtures in tests/kit/."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from kit.net import free_port


@pytest.fixture
def port() -> int:
    return free_port()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama as a HF directory (`tiny_config()`, seed 0, one safetensors file, a tokenizer)."""
    from kit.checkpoints import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny")


@pytest.fixture(scope="session")
def smol_gguf() -> Path:
    """The embedded SmolLM2-135M GGUF file; the test is skipped where the model package is not installed."""
    from services.contracts.errors import NotFound
    from services.engine.loader import default_model_path

    try:
        return default_model_path()
    except NotFound as exc:
        pytest.skip(exc.message)


@pytest.fixture(scope="module")
def smol_engine(smol_gguf: Path):
    """The embedded SmolLM2-135M loaded on the CPU (what `load_engine(None)` serves)."""
    from services.engine import load_engine

    return load_engine(smol_gguf, device="cpu")


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real redis-server of our own on a free port, so tests never touch the machine's instance."""
    exe = shutil.which("redis-server")
    if exe is None:
        pytest.skip("redis-server is not installed")
    p = free_port()
    workdir = tmp_path_factory.mktemp("redis")
    proc = subprocess.Popen([exe, "--port", str(p), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--dir", str(workdir)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    import redis

    client = redis.Redis(port=p)
    for _ in range(100):
        try:
            client.ping()
            break
        except redis.ConnectionError:
            time.sleep(0.05)
    yield f"redis://127.0.0.1:{p}/0"
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """Every in-process model runs on one torch thread: the test models are small, and on a 2-core machine
    shared with worker subprocesses two OpenMP threads stall each other at every op."""
    from kit.checkpoints import torch_threads

    with torch_threads(1):
        yield


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except ImportError:
        has_gpu = False
    if has_gpu:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.get_closest_marker("gpu") is not None:  # not item.keywords: a checkout named "gpu" matched it
            item.add_marker(skip)
