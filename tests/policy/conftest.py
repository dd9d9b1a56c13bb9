"""Policy-area fixtures: a small random policy checkpoint and the Policy gRPC server serving it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from kit.net import free_port


@pytest.fixture(scope="module")
def tiny_policy_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small random checkpoint with schedules, written the way the real one is."""
    import torch

    from services.bench import policy as bench
    from services.policy import checkpoint, task
    from services.policy.model import Denoiser, DenoiserConfig
    from services.policy.sampler import Normalizer

    d = tmp_path_factory.mktemp("policy")
    torch.manual_seed(0)
    model = Denoiser(DenoiserConfig(n_layer=2, n_emb=32, n_head=2)).eval()
    obs, act = task.demonstrations(5, 16)
    checkpoint.save(model, Normalizer.fit(obs, act), d)
    model, norm, _ = checkpoint.load(d)
    sched = bench.compute_schedules(model, norm, n_obs=4, budgets={"ddim20": [5]})
    (d / checkpoint.SCHEDULES).write_text(json.dumps(sched))
    return d


@pytest.fixture(scope="module")
def policy_metrics_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def policy_server(tiny_policy_checkpoint: Path, policy_metrics_port: int):
    """The Policy gRPC server in this process (ddim20 + BAC at budget 5, 100 ms batching window)."""
    from services.policy.server import serve

    srv = serve(0, str(tiny_policy_checkpoint), host="127.0.0.1", sampler="ddim20", cache="bac", budget=5,
                window_ms=100, metrics_port=policy_metrics_port, block=False)
    yield srv
    srv.stop()
