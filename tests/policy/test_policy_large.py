"""The larger committed policy (8 layers, n_emb 256) that the GPU goal rows use: it loads with its hash,
its schedules pass the exactness claims, and BAC at S = 20 stays close to the uncached chunk."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from services.bench import policy as bench
from services.bench import policy_evaluate as ev
from services.policy import checkpoint
from services.policy.bac import block_evals
from services.policy.schedule import make_sampler

LARGE = Path(checkpoint.__file__).parent / "checkpoints_large"
GPU_TABLE = Path(__file__).resolve().parents[2] / "docs" / "results" / "policy" / "policy_gpu_large.json"


@pytest.mark.slow
def test_large_checkpoint_schedules_and_bac_fidelity() -> None:
    model, norm, meta = checkpoint.load(LARGE)
    assert (model.cfg.n_layer, model.cfg.n_emb) == (8, 256) and model.cfg.n_blocks == 24
    schedules = checkpoint.load_schedules(LARGE)
    checks = bench.exact_checks(model, norm, schedules)
    assert all(checks.values()), checks
    # Action MSE against the uncached chunk (same noise, the bench's 64 observations), recomputed on the CPU: BAC
    # at S = 20 (548 evaluations) is closer to uncached than uniform at S = 22 (528), and agrees with the H200
    # table in docs/results/policy/policy_gpu_large.json.
    sampler = make_sampler(*bench.SAMPLERS["ddpm100"])
    calib = ev.eval_obs(64, 11)
    ref = ev.chunk(model, norm, sampler, calib, 7, None)
    gpu = {r["config"]: r for r in json.loads(GPU_TABLE.read_text())["rows"]}
    errs = {}
    for cfg in (bench.PolicyBenchConfig("ddpm100", 20, "bac"), bench.PolicyBenchConfig("ddpm100", 22, "uniform")):
        plan = bench.plan_of(cfg, schedules, model.cfg.n_blocks)
        assert block_evals(plan) == gpu[cfg.name]["block_evals"] < 0.25 * 100 * 24
        errs[cfg.name] = float(np.mean((ev.chunk(model, norm, sampler, calib, 7, plan) - ref) ** 2))
        assert errs[cfg.name] == pytest.approx(gpu[cfg.name]["action_mse"], rel=0.1)
    assert 0 < errs["ddpm100/bac/S=20"] < errs["ddpm100/uniform/S=22"], errs
