"""DDPM / DDIM noise schedules (squaredcos_cap_v2, ε-prediction, clipped x0), written for static graphs.

Every per-step coefficient is a Python float computed up front, so a denoising loop does no host syncs
and can be captured once in a CUDA graph.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

# The samplers a policy worker serves, by name: (schedule kind, denoising steps).
SAMPLERS = {"ddpm100": ("ddpm", 100), "ddim20": ("ddim", 20), "ddim10": ("ddim", 10)}

TRAIN_STEPS = 100


def cosine_betas(n: int, max_beta: float = 0.999) -> np.ndarray:
    """Betas of the squared-cosine ᾱ(t) schedule (Nichol & Dhariwal), capped at max_beta."""
    def abar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    return np.array([min(1 - abar((i + 1) / n) / abar(i / n), max_beta) for i in range(n)], np.float64)


def alphas_cumprod(n: int = TRAIN_STEPS) -> np.ndarray:
    return np.cumprod(1.0 - cosine_betas(n))


@dataclass(slots=True)
class NoiseSchedule:
    """A fixed list of timesteps and the per-step update x_{t} → x_{prev}."""

    timesteps: list[int]
    c_x0_eps: list[tuple[float, float]]  # x0 = a·x − b·ε
    c_mean: list[tuple[float, float]]  # mean = a·clip(x0) + b·x
    sigma: list[float]  # std of the added noise (0 for DDIM)

    @property
    def steps(self) -> int:
        return len(self.timesteps)

    def step(self, eps: torch.Tensor, i: int, x: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
        a, b = self.c_x0_eps[i]
        x0 = (a * x - b * eps).clamp(-1.0, 1.0)
        m0, mx = self.c_mean[i]
        out = m0 * x0 + mx * x
        if self.sigma[i] > 0 and noise is not None:
            out = out + self.sigma[i] * noise
        return out


def ddpm(train_steps: int = TRAIN_STEPS) -> NoiseSchedule:
    """Ancestral DDPM over every training step, 'fixed_small' posterior variance."""
    betas = cosine_betas(train_steps)
    abar = np.cumprod(1 - betas)
    ts = list(range(train_steps - 1, -1, -1))
    c_x0, c_mean, sigma = [], [], []
    for t in ts:
        prev = abar[t - 1] if t > 0 else 1.0
        c_x0.append((1 / math.sqrt(abar[t]), math.sqrt(1 / abar[t] - 1)))
        c_mean.append((math.sqrt(prev) * betas[t] / (1 - abar[t]), math.sqrt(1 - betas[t]) * (1 - prev) / (1 - abar[t])))
        var = (1 - prev) / (1 - abar[t]) * betas[t]
        sigma.append(math.sqrt(max(var, 1e-20)) if t > 0 else 0.0)
    return NoiseSchedule(ts, c_x0, c_mean, sigma)


def ddim(steps: int, train_steps: int = TRAIN_STEPS) -> NoiseSchedule:
    """Deterministic DDIM (η = 0) over `steps` evenly spaced ('leading') timesteps."""
    abar = alphas_cumprod(train_steps)
    ratio = train_steps // steps
    ts = [i * ratio for i in range(steps)][::-1]
    c_x0, c_mean = [], []
    for t in ts:
        prev = abar[t - ratio] if t - ratio >= 0 else 1.0
        c_x0.append((1 / math.sqrt(abar[t]), math.sqrt(1 / abar[t] - 1)))
        # x_prev = √ᾱ_prev·x0 + √(1−ᾱ_prev)·ε, with ε re-derived from the clipped x0
        k = math.sqrt(1 - prev) / math.sqrt(1 - abar[t])
        c_mean.append((math.sqrt(prev) - k * math.sqrt(abar[t]), k))
    return NoiseSchedule(ts, c_x0, c_mean, [0.0] * steps)


def make_sampler(kind: str, steps: int) -> NoiseSchedule:
    if kind == "ddpm":
        return ddpm(steps)
    if kind == "ddim":
        return ddim(steps)
    raise ValueError(f"sampler must be 'ddpm' or 'ddim', got {kind!r}")


def add_noise(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, abar: torch.Tensor) -> torch.Tensor:
    """Forward process q(x_t | x0) for training."""
    a = abar[t].view(-1, *([1] * (x0.dim() - 1)))
    return a.sqrt() * x0 + (1 - a).sqrt() * noise
