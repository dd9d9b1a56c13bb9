"""The BAC benchmark table: every method side by side on one checkpoint, same noise, same scenes.

Imports only torch/numpy and this package (the GPU box has nothing else).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from services.policy import evaluate as ev
from services.policy.bac import (
    CacheHook,
    acs_steps,
    block_evals,
    brute_force_steps,
    full_plan,
    plan_from_steps,
    schedule_score,
)
from services.policy.model import Denoiser
from services.policy.sampler import Normalizer, Policy, denoise, draw_noise
from services.policy.schedule import Sampler, make_sampler

SAMPLERS = {"ddpm100": ("ddpm", 100), "ddim20": ("ddim", 20), "ddim10": ("ddim", 10)}
BUDGETS = {"ddpm100": [5, 7, 10], "ddim20": [5, 10]}
# extra uniform budgets whose block evaluations match the BAC rows (BU adds updates beyond S)
MATCHED = {"ddpm100": [6, 9, 12, 16], "ddim20": [6, 12]}
METHODS = ("uniform", "unified", "acs", "bac")


@dataclass(slots=True, frozen=True)
class Config:
    sampler: str  # key of SAMPLERS
    budget: int | None  # None = uncached
    method: str

    @property
    def name(self) -> str:
        return f"{self.sampler}/{self.method}" + (f"/S={self.budget}" if self.budget else "")


def full_configs() -> list[Config]:
    rows = [Config("ddpm100", None, "uncached")]
    rows += [Config("ddpm100", s, m) for s in BUDGETS["ddpm100"] for m in METHODS]
    rows += [Config("ddim10", None, "uncached"), Config("ddim20", None, "uncached")]
    rows += [Config("ddim20", s, m) for s in BUDGETS["ddim20"] for m in ("uniform", "bac")]
    rows += [Config(k, s, "uniform") for k, bs in MATCHED.items() for s in bs]
    rows += [Config("ddpm100", 10, "bac-n9")]
    return rows


def quick_configs(budget: int = 10) -> list[Config]:
    return [Config("ddpm100", None, "uncached"), Config("ddpm100", budget, "uniform"),
            Config("ddpm100", budget, "bac")]


def compute_schedules(model: Denoiser, norm: Normalizer, n_obs: int = 16, top_n: int = 3,
                      budgets: dict[str, list[int]] | None = None) -> dict:
    """{sampler key: {str(S): {method: {"steps": [...]}}}} from an uncached recording per sampler."""
    out = {}
    budgets = budgets or {k: sorted(set(BUDGETS[k]) | set(MATCHED[k])) for k in BUDGETS}
    for key, bs in budgets.items():
        kind, k = SAMPLERS[key]
        out[key] = ev.calibrate(model, norm, make_sampler(kind, k), bs, n_obs=n_obs, top_n=top_n)
    return out


def plan_of(cfg: Config, schedules: dict, n_blocks: int) -> np.ndarray | None:
    if cfg.budget is None:
        return None
    steps = SAMPLERS[cfg.sampler][1]
    return plan_from_steps(schedules[cfg.sampler][str(cfg.budget)][cfg.method]["steps"], steps)


@torch.no_grad()
def graph_latency(model: Denoiser, sampler: Sampler, plan: np.ndarray | None, obs: torch.Tensor, reps: int) -> float:
    """Median seconds per batch-1 chunk with the whole static schedule captured in one CUDA graph."""
    cfg = model.cfg
    s_obs = obs[:1].clone()
    s_noise = draw_noise(sampler, 1, cfg.horizon, cfg.act_dim, 0, obs.device)
    ts = torch.tensor(sampler.timesteps, device=obs.device)

    def run() -> torch.Tensor:
        return denoise(model, sampler, s_obs, s_noise, CacheHook(plan) if plan is not None else None, ts)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            run()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        graph.replay()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def exact_checks(model: Denoiser, norm: Normalizer, schedules: dict) -> dict[str, bool]:
    """The issue's exactness claims, checked on the real checkpoint."""
    dev = next(model.parameters()).device
    obs = torch.from_numpy(norm.obs(ev.eval_obs(4, 5))).to(dev)
    checks = {}
    for key in ("ddpm100", "ddim20"):
        sampler = make_sampler(*SAMPLERS[key])
        noise = draw_noise(sampler, 4, model.cfg.horizon, model.cfg.act_dim, 1, dev)
        ref = denoise(model, sampler, obs, noise)
        full = denoise(model, sampler, obs, noise, CacheHook(full_plan(sampler.steps, model.cfg.n_blocks)))
        checks[f"update_every_step_equals_uncached_{key}"] = bool(torch.equal(ref, full))
    rng = np.random.default_rng(0)
    dp_ok = True
    for _ in range(30):
        k = int(rng.integers(4, 10))
        f = rng.normal(size=(k, 6)).cumsum(0)
        f /= np.linalg.norm(f, axis=1, keepdims=True)
        sim = f @ f.T
        for s in range(2, k):
            dp_ok &= abs(schedule_score(sim, acs_steps(sim, s)) - brute_force_steps(sim, s)[1]) < 1e-9
    checks["dp_equals_brute_force"] = bool(dp_ok)
    contains, last = True, True
    for key, per_budget in schedules.items():
        k = SAMPLERS[key][1]
        for plans in per_budget.values():
            contains &= all(set(a) <= set(b) for a, b in zip(plans["acs"]["steps"], plans["bac"]["steps"], strict=True))
            for m in plans.values():
                last &= all(s[0] == 0 and s[-1] == k - 1 for s in m["steps"])
    checks["bua_contains_acs"] = bool(contains)
    checks["first_and_last_step_update"] = bool(last)
    return checks


def run_table(model: Denoiser, norm: Normalizer, schedules: dict, configs: list[Config], episodes: int,
              reps: int, n_mse: int = 64, graphs: bool = False, seed: int = 1000,
              progress: Callable[[str], None] = print) -> list[dict]:
    """One row per config: evals, MSE vs uncached (calibration and held-out obs), success + CI, latency."""
    dev = next(model.parameters()).device
    calib, held = ev.eval_obs(n_mse, 11), ev.eval_obs(n_mse, 99)
    refs: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    rows: list[dict] = []
    for cfg in configs:
        sampler = make_sampler(*SAMPLERS[cfg.sampler])
        plan = plan_of(cfg, schedules, model.cfg.n_blocks)
        t0 = time.perf_counter()
        env = ev.rollout(Policy(model, norm, sampler, plan), episodes, seed)
        succ = env.success
        row = {"config": cfg.name, "sampler": cfg.sampler, "method": cfg.method, "budget": cfg.budget,
               "block_evals": block_evals(plan) if plan is not None else model.cfg.n_blocks * sampler.steps,
               "success_rate": float(succ.mean()), "success_ci95": list(ev.wilson(int(succ.sum()), len(succ))),
               "crash_rate": float(env.crashed.mean()), "timeout_rate": float((~env.reached & ~env.crashed).mean()),
               "episodes": int(len(succ))}
        row["rollout_seconds"] = round(time.perf_counter() - t0, 2)
        if cfg.sampler not in refs:  # the uncached chunks on the same noise, once per sampler
            refs[cfg.sampler] = (ev.chunk(model, norm, sampler, calib, 7, None), ev.chunk(model, norm, sampler, held, 7, None))
        if plan is None:
            row["action_mse"] = row["action_mse_heldout"] = 0.0
        else:
            row["action_mse"] = float(np.mean((ev.chunk(model, norm, sampler, calib, 7, plan) - refs[cfg.sampler][0]) ** 2))
            row["action_mse_heldout"] = float(np.mean((ev.chunk(model, norm, sampler, held, 7, plan) - refs[cfg.sampler][1]) ** 2))
        if graphs:
            row["seconds_graph"] = graph_latency(model, sampler, plan, torch.from_numpy(norm.obs(held)).to(dev),
                                                 max(reps, 20))
        progress(f"{cfg.name}: success {row['success_rate']:.3f} mse {row['action_mse']:.2e} "
                 f"evals {row['block_evals']}")
        rows.append(row)
    policies = [Policy(model, norm, make_sampler(*SAMPLERS[c.sampler]), plan_of(c, schedules, model.cfg.n_blocks))
                for c in configs]
    times = ev.latencies(policies, reps, held)
    ref = next((i for i, c in enumerate(configs) if c.sampler == "ddpm100" and c.method == "uncached"), 0)
    for row, t in zip(rows, times, strict=True):
        row["seconds"], row["seconds_min"] = float(np.median(t)), float(np.min(t))
        row["evals_saved"] = 1 - row["block_evals"] / rows[ref]["block_evals"]
        row["speedup"] = rows[ref]["seconds"] / row["seconds"]
        row["speedup_min"] = rows[ref]["seconds_min"] / row["seconds_min"]
        if graphs:
            row["speedup_graph"] = rows[ref]["seconds_graph"] / row["seconds_graph"]
    return rows


@torch.no_grad()
def chunk_flops(model: Denoiser, norm: Normalizer, schedules: dict, configs: list[Config]) -> dict[str, float]:
    """FLOPs of one batch-1 chunk per config, counted by torch's FlopCounterMode on a real denoise."""
    from torch.utils.flop_counter import FlopCounterMode

    obs = torch.from_numpy(norm.obs(ev.eval_obs(1, 5)))
    out = {}
    for cfg in configs:
        sampler = make_sampler(*SAMPLERS[cfg.sampler])
        plan = plan_of(cfg, schedules, model.cfg.n_blocks)
        noise = draw_noise(sampler, 1, model.cfg.horizon, model.cfg.act_dim, 0)
        with FlopCounterMode(display=False) as counter:
            denoise(model, sampler, obs, noise, CacheHook(plan) if plan is not None else None)
        out[cfg.name] = float(counter.get_total_flops())
    return out
