"""The CLI contracts: `tandem policy schedule` and `tandem bench policy --quick --json` (tiny settings)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from services.policy import checkpoint, task
from services.policy.model import Denoiser, DenoiserConfig
from services.policy.sampler import Normalizer


def tandem(*args: str) -> subprocess.CompletedProcess:
    # one torch thread: the tiny model gains nothing from two, and OpenMP spinning on a shared box costs a lot
    return subprocess.run([sys.executable, "-m", "services.cli", *args], capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_schedule_then_quick_bench_contract(tmp_path: Path) -> None:
    """`tandem policy schedule` then `tandem bench policy --quick --json` on a tiny checkpoint (cheap on CPU)."""
    torch.manual_seed(0)
    obs, act = task.demonstrations(3, 16)
    checkpoint.save(Denoiser(DenoiserConfig(n_layer=2, n_emb=32, n_head=2)), Normalizer.fit(obs, act), tmp_path)
    res = tandem("policy", "schedule", "--checkpoint", str(tmp_path), "--calib-obs", "2", "--threads", "1")
    assert res.returncode == 0, res.stderr
    sched = json.loads((tmp_path / checkpoint.SCHEDULES).read_text())
    assert set(sched) == {"ddpm100", "ddim20"} and {"5", "7", "10"} <= set(sched["ddpm100"])
    for per in sched.values():
        for plans in per.values():
            assert {"acs", "bac", "unified", "uniform"} <= set(plans)
            assert all(set(a) <= set(b) for a, b in zip(plans["acs"]["steps"], plans["bac"]["steps"], strict=True))

    out = tmp_path / "bench.json"
    res = tandem("bench", "policy", "--quick", "--json", str(out), "--checkpoint", str(tmp_path),
                 "--episodes", "2", "--reps", "1", "--threads", "1")
    assert res.returncode == 0, res.stderr
    doc = json.loads(out.read_text())
    for method in ("uncached", "uniform", "bac"):
        assert {"success_rate", "action_mse", "block_evals", "seconds"} <= set(doc[method])
        assert 0.0 <= doc[method]["success_rate"] <= 1.0 and doc[method]["seconds"] > 0
    assert doc["uncached"]["action_mse"] == 0.0 and doc["uncached"]["block_evals"] == 6 * 100
    assert doc["uniform"]["block_evals"] == 6 * 10 and doc["bac"]["block_evals"] >= 6 * 10
    assert doc["uniform"]["action_mse"] > 0.0
    assert doc["exact_checks"] and all(doc["exact_checks"].values())


def test_bench_rejects_unknown_budget() -> None:
    res = tandem("bench", "policy", "--quick", "--budget", "3")
    assert res.returncode == 2 and "budget" in res.stderr and "Traceback" not in res.stderr
