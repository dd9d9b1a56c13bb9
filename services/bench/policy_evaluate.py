"""Measurements shared by the benchmark and the GPU script: rollouts, action MSE, latency, calibration."""

from __future__ import annotations

import time

import numpy as np
import torch

from services.policy import task
from services.policy.bac import RecordHook, make_plans, plan_from_steps
from services.policy.model import Denoiser
from services.policy.sampler import N_ACTION_STEPS, Normalizer, Policy, denoise, draw_noise
from services.policy.schedule import NoiseSchedule


def rollout(policy: Policy, n: int, seed: int) -> task.Env:
    """Run n episodes in lock-step (one batched denoise per re-plan); the finished env holds the outcomes."""
    env = task.Env(task.sample_scenes(n, np.random.default_rng(seed)))
    chunk = 0
    while not env.done.all():
        actions = policy.act(env.obs(), seed=seed * 1000 + chunk)
        chunk += 1
        for k in range(N_ACTION_STEPS):
            env.step(actions[:, k])
            if env.done.all():
                break
    return env


def eval_obs(n: int, seed: int) -> np.ndarray:
    """Observations visited by the expert on fresh scenes: calibration and held-out sets."""
    obs, _ = task.demonstrations(max(1, n // 10), 16, seed=seed)
    idx = np.random.default_rng(seed).choice(len(obs), size=min(n, len(obs)), replace=False)
    return obs[idx]


def chunk(model: Denoiser, norm: Normalizer, sampler: NoiseSchedule, obs: np.ndarray, seed: int,
          plan: np.ndarray | None) -> np.ndarray:
    """Normalised action chunk for fixed noise (so plans compare on the same noise)."""
    pol = Policy(model, norm, sampler, plan)
    return norm.act(pol.act(obs, seed))


@torch.no_grad()
def record(model: Denoiser, norm: Normalizer, sampler: NoiseSchedule, obs: np.ndarray, seed: int = 3) -> list[torch.Tensor]:
    """Every block's output at every step of an uncached run: list over blocks of (K, B, T, E)."""
    dev = next(model.parameters()).device
    hook = RecordHook(model.cfg.n_blocks)
    noise = draw_noise(sampler, len(obs), model.cfg.horizon, model.cfg.act_dim, seed, dev)
    denoise(model, sampler, torch.from_numpy(norm.obs(obs)).to(dev), noise, hook)
    return [hook.stacked(b) for b in range(model.cfg.n_blocks)]


def calibrate(model: Denoiser, norm: Normalizer, sampler: NoiseSchedule, budgets: list[int], n_obs: int = 16,
              seed: int = 11, top_n: int = 3, widths: tuple[int, ...] | None = None) -> dict[str, dict]:
    """Schedules for every budget: {str(S): {method: {"steps": per-block lists, ...}}}."""
    outs = record(model, norm, sampler, eval_obs(n_obs, seed))
    return {str(s): make_plans(outs, s, top_n, widths) for s in budgets}


def plans_for(schedules: dict, budget: int, steps: int, n_blocks: int) -> dict[str, np.ndarray]:
    return {m: plan_from_steps(v["steps"], steps) for m, v in schedules[str(budget)].items()
            if len(v["steps"]) == n_blocks}


def latencies(policies: list[Policy], reps: int, obs: np.ndarray) -> list[list[float]]:
    """Batch-1 seconds per chunk (eager), round-robin over the policies so that load from other
    processes lands on every config alike rather than on whichever ran during a spike."""
    for pol in policies:
        pol.act(obs[:1], 0)
    times: list[list[float]] = [[] for _ in policies]
    for r in range(reps):
        one = obs[r % len(obs):r % len(obs) + 1]
        for i, pol in enumerate(policies):
            t0 = time.perf_counter()
            pol.act(one, r)
            if pol.device.type == "cuda":
                torch.cuda.synchronize()
            times[i].append(time.perf_counter() - t0)
    return times
