"""DLM-area fixtures: the diffusion gRPC server in this process, a cluster with a dlm worker, in-process answers."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
from kit.cluster import start_roles
from kit.net import free_port


@pytest.fixture(scope="module")
def dlm_server():
    """The diffusion gRPC server on a free port in this process, on one torch thread (what serve() does by default,
    undone afterwards for the rest of the suite)."""
    import torch

    from services.dlm.server import serve

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    running = serve(0, metrics_port=free_port(), threads=None, block=False)
    yield running
    running.stop()
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def dlm_cluster(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory):
    """`tandem up` of a mixed worker (the tiny model), a dlm worker and a policy worker (started too; no gateway
    route)."""
    up = start_roles(tmp_path_factory.mktemp("dlmcluster"), str(tiny_checkpoint), ["mixed", "dlm", "policy"], "dlm")
    yield up
    if up.proc.poll() is None:
        up.stop(signal.SIGKILL)


@pytest.fixture(scope="module")
def dlm_reference():
    """generate_text in this process (one torch thread, as the worker runs), memoized per prompt."""
    import torch

    from services.dlm.server import generate_text

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    cache: dict[str, str] = {}

    def ref(prompt: str) -> str:
        if prompt not in cache:
            cache[prompt] = "".join(generate_text(prompt))
        return cache[prompt]

    yield ref
    torch.set_num_threads(before)
