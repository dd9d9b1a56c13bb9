"""The BAC benchmark table: every method side by side on one checkpoint, same noise, same scenes.

Imports only torch/numpy and this package (the GPU box has nothing else).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from services.bench import policy_evaluate as ev
from services.bench.stats import wilson
from services.policy.bac import (
    CacheHook,
    acs_steps,
    block_evals,
    brute_force_steps,
    full_plan,
    make_plans,
    plan_from_steps,
    schedule_score,
    uniform_steps,
)
from services.policy.model import Denoiser
from services.policy.sampler import Normalizer, Policy, denoise, draw_noise
from services.policy.schedule import SAMPLERS, NoiseSchedule, make_sampler

BUDGETS = {"ddpm100": [5, 7, 10], "ddim20": [5, 10]}
# extra uniform budgets whose block evaluations match the BAC rows (BU adds updates beyond S)
MATCHED = {"ddpm100": [6, 9, 12, 16, 20, 21, 22, 27, 36], "ddim20": [6, 12]}
METHODS = ("uniform", "unified", "acs", "bac")
# Bubbling-Union widths beyond `bac`'s n = 3, stored as `bac-n{w}` for every budget; 17 = all upstream blocks
BU_WIDTHS = (9, 17)
# (S, BU width) rows beyond `bac`: n = 9 at S = 10 (285 evaluations) and 12 (350), and the union over all
# upstream blocks at S = 10 (390), 12 (486) and 16 (646); matched uniform: S = 16, 20, 21/22, 27, 36
WIDE = {"ddpm100": [(10, 9), (12, 9), (10, 17), (12, 17), (16, 17)]}
# budgets where `bac` itself (n = 3) is also a row beyond BUDGETS: S = 16 (350 evaluations)
BAC_EXTRA = {"ddpm100": [16]}


@dataclass(slots=True, frozen=True)
class PolicyBenchConfig:
    sampler: str  # key of SAMPLERS
    budget: int | None  # None = uncached
    method: str

    @property
    def name(self) -> str:
        return f"{self.sampler}/{self.method}" + (f"/S={self.budget}" if self.budget else "")


def full_configs() -> list[PolicyBenchConfig]:
    rows = [PolicyBenchConfig("ddpm100", None, "uncached")]
    rows += [PolicyBenchConfig("ddpm100", s, m) for s in BUDGETS["ddpm100"] for m in METHODS]
    rows += [PolicyBenchConfig("ddim10", None, "uncached"), PolicyBenchConfig("ddim20", None, "uncached")]
    rows += [PolicyBenchConfig("ddim20", s, m) for s in BUDGETS["ddim20"] for m in ("uniform", "bac")]
    rows += [PolicyBenchConfig(k, s, "uniform") for k, bs in MATCHED.items() for s in bs]
    rows += [PolicyBenchConfig(k, s, "bac") for k, bs in BAC_EXTRA.items() for s in bs]
    rows += [PolicyBenchConfig(k, s, f"bac-n{w}") for k, sw in WIDE.items() for s, w in sw]
    return rows


def quick_configs(budget: int = 10) -> list[PolicyBenchConfig]:
    return [PolicyBenchConfig("ddpm100", None, "uncached"), PolicyBenchConfig("ddpm100", budget, "uniform"),
            PolicyBenchConfig("ddpm100", budget, "bac")]


def default_budgets() -> dict[str, list[int]]:
    """Every budget a benchmark row or the service needs, per sampler."""
    return {k: sorted(set(BUDGETS[k]) | set(MATCHED[k]) | {s for s, _ in WIDE.get(k, [])} | set(BAC_EXTRA.get(k, [])))
            for k in BUDGETS}


def compute_schedules(model: Denoiser, norm: Normalizer, n_obs: int = 16, top_n: int = 3,
                      budgets: dict[str, list[int]] | None = None,
                      widths: tuple[int, ...] = BU_WIDTHS) -> dict:
    """{sampler key: {str(S): {method: {"steps": [...]}}}} from an uncached recording per sampler."""
    out = {}
    budgets = budgets or default_budgets()
    for key, bs in budgets.items():
        kind, k = SAMPLERS[key]
        out[key] = ev.calibrate(model, norm, make_sampler(kind, k), bs, n_obs=n_obs, top_n=top_n, widths=widths)
    return out


def plan_of(cfg: PolicyBenchConfig, schedules: dict, n_blocks: int) -> np.ndarray | None:
    if cfg.budget is None:
        return None
    steps = SAMPLERS[cfg.sampler][1]
    return plan_from_steps(schedules[cfg.sampler][str(cfg.budget)][cfg.method]["steps"], steps)


@torch.no_grad()
def capture_graph(model: Denoiser, sampler: NoiseSchedule, plan: np.ndarray | None, obs: torch.Tensor) -> torch.cuda.CUDAGraph:
    """The whole static schedule of one batch-1 chunk (all K steps, cache reads included) as one CUDA graph."""
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
    return graph


def graph_latencies(graphs: list[torch.cuda.CUDAGraph], reps: int) -> list[list[float]]:
    """Seconds per replay, round-robin over the graphs (each repetition replays every graph once)."""
    times: list[list[float]] = [[] for _ in graphs]
    for _ in range(reps):
        for i, g in enumerate(graphs):
            t0 = time.perf_counter()
            g.replay()
            torch.cuda.synchronize()
            times[i].append(time.perf_counter() - t0)
    return times


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
            for m in (m for m in plans if m == "bac" or m.startswith("bac-n")):  # every BU width
                contains &= all(set(a) <= set(b) for a, b in zip(plans["acs"]["steps"], plans[m]["steps"], strict=True))
            for m in plans.values():
                last &= all(s[0] == 0 and s[-1] == k - 1 for s in m["steps"])
    checks["bua_contains_acs"] = bool(contains)
    checks["first_and_last_step_update"] = bool(last)
    return checks


def run_table(model: Denoiser, norm: Normalizer, schedules: dict, configs: list[PolicyBenchConfig], episodes: int,
              reps: int, n_mse: int = 64, graphs: bool = False, seed: int = 1000,
              progress: Callable[[str], None] = print) -> list[dict]:
    """One row per config: evals, MSE vs uncached (calibration and held-out obs), success + CI, latency."""
    dev = next(model.parameters()).device
    calib, held = ev.eval_obs(n_mse, 11), ev.eval_obs(n_mse, 99)
    refs: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    rows: list[dict] = []
    cuda_graphs: list[torch.cuda.CUDAGraph] = []
    for cfg in configs:
        sampler = make_sampler(*SAMPLERS[cfg.sampler])
        plan = plan_of(cfg, schedules, model.cfg.n_blocks)
        t0 = time.perf_counter()
        env = ev.rollout(Policy(model, norm, sampler, plan), episodes, seed)
        succ = env.success
        row = {"config": cfg.name, "sampler": cfg.sampler, "method": cfg.method, "budget": cfg.budget,
               "block_evals": block_evals(plan) if plan is not None else model.cfg.n_blocks * sampler.steps,
               "success_rate": float(succ.mean()), "success_ci95": list(wilson(int(succ.sum()), len(succ))),
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
            cuda_graphs.append(capture_graph(model, sampler, plan, torch.from_numpy(norm.obs(held)).to(dev)))
        progress(f"{cfg.name}: success {row['success_rate']:.3f} mse {row['action_mse']:.2e} "
                 f"evals {row['block_evals']}")
        rows.append(row)
    policies = [Policy(model, norm, make_sampler(*SAMPLERS[c.sampler]), plan_of(c, schedules, model.cfg.n_blocks))
                for c in configs]
    times = ev.latencies(policies, reps, held)
    ref = next((i for i, c in enumerate(configs) if c.sampler == "ddpm100" and c.method == "uncached"), 0)
    if graphs:  # round-robin, like the eager timings, so drift on the shared host hits every config alike
        for row, t in zip(rows, graph_latencies(cuda_graphs, max(reps, 20)), strict=True):
            row["seconds_graph"], row["seconds_graph_min"] = float(np.median(t)), float(np.min(t))
    for row, t in zip(rows, times, strict=True):
        row["seconds"], row["seconds_min"] = float(np.median(t)), float(np.min(t))
        row["evals_saved"] = 1 - row["block_evals"] / rows[ref]["block_evals"]
        row["speedup"] = rows[ref]["seconds"] / row["seconds"]
        row["speedup_min"] = rows[ref]["seconds_min"] / row["seconds_min"]
        if graphs:
            row["speedup_graph"] = rows[ref]["seconds_graph"] / row["seconds_graph"]
            row["speedup_graph_min"] = rows[ref]["seconds_graph_min"] / row["seconds_graph_min"]
    return rows


@torch.no_grad()
def chunk_flops(model: Denoiser, norm: Normalizer, schedules: dict, configs: list[PolicyBenchConfig]) -> dict[str, float]:
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


def screen(model: Denoiser, norm: Normalizer, budgets: list[int], widths: list[int], uniform: list[int],
           sampler_key: str = "ddpm100", n_obs: int = 16, n_mse: int = 64, dev_episodes: int = 0,
           dev_seed: int = 2000, progress: Callable[[str], None] = print) -> list[dict]:
    """Cheap search over (S, BU width): block evaluations and per-observation action MSE vs uncached.

    Schedules come from the same calibration recording as `compute_schedules`; MSE is over the calibration-
    style and held-out observation sets together (2 x n_mse), per observation, so that a rare left/right
    mode flip (large, but harmless to success) shows in `max` and `flips` instead of swamping the mean.
    With dev_episodes > 0, also rollout success on *dev* scenes (seed `dev_seed`, not the benchmark's).
    """
    kind, k = SAMPLERS[sampler_key]
    sampler = make_sampler(kind, k)
    outs = ev.record(model, norm, sampler, ev.eval_obs(n_obs, 11))
    obs = np.concatenate([ev.eval_obs(n_mse, 11), ev.eval_obs(n_mse, 99)])
    ref = ev.chunk(model, norm, sampler, obs, 7, None)
    cands: list[tuple[str, np.ndarray]] = []
    for s in budgets:
        plans = make_plans(outs, s, top_n=3, widths=tuple(widths))
        cands += [(f"bac-n{w}/S={s}", plan_from_steps(plans[f"bac-n{w}"]["steps"], k)) for w in widths]
    cands += [(f"uniform/S={s}", plan_from_steps([uniform_steps(k, s)] * model.cfg.n_blocks, k)) for s in uniform]
    rows = []
    for name, plan in cands:
        d = ((ev.chunk(model, norm, sampler, obs, 7, plan) - ref) ** 2).mean((1, 2))
        row = {"config": f"{sampler_key}/{name}", "block_evals": block_evals(plan), "mse_mean": float(d.mean()),
               "mse_median": float(np.median(d)), "mse_p90": float(np.quantile(d, 0.9)), "mse_max": float(d.max()),
               "flips": int((d > 1e-2).sum()), "n_obs": int(len(d))}
        if dev_episodes:
            env = ev.rollout(Policy(model, norm, sampler, plan), dev_episodes, dev_seed)
            n_ok = int(env.success.sum())
            row |= {"dev_success": n_ok / dev_episodes, "dev_ci95": list(wilson(n_ok, dev_episodes))}
        progress(f"{row['config']}: evals {row['block_evals']} median MSE {row['mse_median']:.2e}")
        rows.append(row)
    return rows
