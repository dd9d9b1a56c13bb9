"""Block-wise Adaptive Caching: cache hooks, the Adaptive Caching Scheduler (DP) and the Bubbling Union.

A plan is a bool array (K steps, n_blocks): True = compute the block's residual branch at that step,
False = reuse its last computed output. Step 0 and the last step always compute.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import numpy as np
import torch


class CacheHook:
    """Runs one denoising chunk under a plan; the sampler sets `step` before each model call."""

    def __init__(self, plan: np.ndarray) -> None:
        self.plan = plan.astype(bool)
        self.step = 0
        self.cache: list[torch.Tensor | None] = [None] * plan.shape[1]
        self.evals = 0

    def run(self, b: int, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        cached = self.cache[b]
        if cached is None or self.plan[self.step, b]:
            cached = self.cache[b] = compute()
            self.evals += 1
        return cached


class RecordHook:
    """Computes every block and keeps its output at every step: outputs[b][step] (B, T, E) on CPU."""

    def __init__(self, n_blocks: int) -> None:
        self.step = 0
        self.outputs: list[list[torch.Tensor]] = [[] for _ in range(n_blocks)]

    def run(self, b: int, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        y = compute()
        self.outputs[b].append(y.detach().float().cpu())
        return y

    def stacked(self, b: int) -> torch.Tensor:
        return torch.stack(self.outputs[b])  # (K, B, T, E)


def full_plan(steps: int, n_blocks: int) -> np.ndarray:
    return np.ones((steps, n_blocks), bool)


def plan_from_steps(per_block: list[list[int]], steps: int) -> np.ndarray:
    plan = np.zeros((steps, len(per_block)), bool)
    for b, s in enumerate(per_block):
        plan[s, b] = True
    plan[0] = plan[-1] = True
    return plan


def block_evals(plan: np.ndarray) -> int:
    return int(plan.sum())


# ---------------------------------------------------------------- similarity and error statistics

def cosine_matrix(outs: torch.Tensor) -> np.ndarray:
    """(K, B, ...) outputs → K×K cosine similarity, averaged over the B calibration samples."""
    flat = outs.flatten(2).double()
    flat = flat / flat.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return torch.einsum("ibd,jbd->ij", flat, flat).div(flat.shape[1]).numpy()


def reuse_error(outs: torch.Tensor, steps: list[int]) -> float:
    """Mean L1 gap between each step's true output and the cached one it would reuse under `steps`."""
    src = np.searchsorted(np.asarray(steps), np.arange(outs.shape[0]), side="right") - 1
    return float((outs - outs[torch.as_tensor(src)]).abs().mean())


# ---------------------------------------------------------------- Adaptive Caching Scheduler

def segment_gain(sim: np.ndarray) -> np.ndarray:
    """G[a, b] = Σ_{t=a..b} sim[a, t]: what a cache refreshed at a earns while reused up to b (O(K²))."""
    pre = np.concatenate([np.zeros((sim.shape[0], 1)), np.cumsum(sim, 1)], 1)
    k = sim.shape[0]
    idx = np.arange(k)
    g = pre[:, 1:] - pre[idx, idx][:, None]
    return np.where(idx[None] >= idx[:, None], g, -np.inf)


def schedule_score(sim: np.ndarray, steps: list[int]) -> float:
    """Summed similarity between each cached feature and the steps that reuse it (incl. itself)."""
    bounds = list(steps) + [sim.shape[0]]
    return float(sum(sim[a, a:b].sum() for a, b in zip(bounds[:-1], bounds[1:], strict=True)))


def acs_steps(sim: np.ndarray, budget: int) -> list[int]:
    """Update steps maximising schedule_score with `budget` updates, step 0 and the last step forced.

    DP over segment starts: best[s][i] = best score covering steps 0..i with s segments; O(S·K²).
    """
    k = sim.shape[0]
    if budget >= k:
        return list(range(k))
    if budget < 2:
        raise ValueError(f"budget must be at least 2 (first and last step), got {budget}")
    n, segs = k - 1, budget - 1  # the last step is its own segment; solve the first k-1 steps
    gain = segment_gain(sim[:n, :n])
    best = gain[0].copy()  # one segment starting at 0, ending at i
    back = []
    for _ in range(2, segs + 1):
        # cand[j, i] = best[j] + gain[j+1, i]: previous segments end at j, a new one covers j+1..i
        cand = best[:-1, None] + gain[1:, :]
        back.append(np.argmax(cand, 0))
        best = cand.max(0)
    steps, i = [], n - 1
    for arg in reversed(back):
        j = int(arg[i])
        steps.append(j + 1)
        i = j
    return sorted([0, *steps, k - 1])


def brute_force_steps(sim: np.ndarray, budget: int) -> tuple[list[int], float]:
    """Exhaustive reference for acs_steps (small K only)."""
    k = sim.shape[0]
    best, arg = -np.inf, None
    for mid in itertools.combinations(range(1, k - 1), budget - 2):
        steps = [0, *mid, k - 1]
        s = schedule_score(sim, steps)
        if s > best:
            best, arg = s, steps
    return arg, best


def uniform_steps(k: int, budget: int) -> list[int]:
    """FORA/DeepCache-style: refresh every ~K/S steps, same budget, first and last step included."""
    return sorted({int(round(x)) for x in np.linspace(0, k - 1, min(budget, k))})


# ---------------------------------------------------------------- Bubbling Union

def bubbling_union(per_block: list[list[int]], errors: list[float], top_n: int) -> tuple[list[list[int]], list[int]]:
    """Refresh the top-n upstream blocks by reuse error whenever an FFN at the same or a deeper layer does.

    A stale upstream block feeds its error into every FFN below it; giving it the FFNs' update steps
    means those FFNs recompute from fresh inputs. Returns the new schedules and the chosen blocks.
    """
    n_blocks = len(per_block)
    upstream = [b for b in range(n_blocks) if b != n_blocks - 1]  # the last FFN has nothing below it
    chosen = sorted(upstream, key=lambda b: -errors[b])[:top_n]
    out = [sorted(s) for s in per_block]
    for b in chosen:
        layer = b // 3
        merged = set(per_block[b])
        for f in range(3 * layer + 2, n_blocks, 3):
            if f != b:
                merged |= set(per_block[f])
        out[b] = sorted(merged)
    return out, sorted(chosen)


# ---------------------------------------------------------------- building all plans from a recording

def make_plans(outs: list[torch.Tensor], budget: int, top_n: int = 3,
               widths: tuple[int, ...] | None = None) -> dict[str, dict]:
    """From per-block recorded outputs (K, B, T, E): ACS, BAC (ACS+BU), unified ACS and uniform plans.

    `top_n` is the Bubbling-Union width of the `bac` plan; every w in `widths` adds a `bac-n{w}` plan that
    differs only in that width (w >= n_blocks - 1 means every upstream block). Default: (3 * top_n,).
    """
    k = outs[0].shape[0]
    sims = [cosine_matrix(o) for o in outs]
    acs = [acs_steps(s, budget) for s in sims]
    errors = [reuse_error(o, s) for o, s in zip(outs, acs, strict=True)]
    bac, chosen = bubbling_union(acs, errors, top_n)
    unified = acs_steps(np.mean(sims, 0), budget)
    uni = uniform_steps(k, budget)
    n = len(outs)
    plans: dict[str, dict] = {"acs": {"steps": acs}, "bac": {"steps": bac, "bu_blocks": chosen}}
    for w in (3 * top_n,) if widths is None else widths:
        wide, wide_chosen = bubbling_union(acs, errors, w)  # same ACS schedules and errors, a wider union
        plans[f"bac-n{w}"] = {"steps": wide, "bu_blocks": wide_chosen}
    plans["unified"] = {"steps": [unified] * n}
    plans["uniform"] = {"steps": [uni] * n}
    return plans
