"""The denoising loop and the policy wrapper: normalise observations, denoise a chunk, unnormalise."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from services.policy.bac import CacheHook, RecordHook
from services.policy.model import Denoiser
from services.policy.schedule import NoiseSchedule

# Actions executed per predicted chunk (Diffusion Policy's n_action_steps).
N_ACTION_STEPS = 8


def draw_noise(sampler: NoiseSchedule, batch: int, horizon: int, act_dim: int, seed: int,
               device: str | torch.device = "cpu") -> torch.Tensor:
    """All the randomness of one chunk up front (initial sample + one draw per step): same noise, any plan."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn((sampler.steps + 1, batch, horizon, act_dim), generator=g).to(device)


@torch.no_grad()
def denoise(model: Denoiser, sampler: NoiseSchedule, obs: torch.Tensor, noise: torch.Tensor,
            hook: CacheHook | RecordHook | None = None, ts: torch.Tensor | None = None) -> torch.Tensor:
    """Normalised obs (B, To, O) → normalised action chunk (B, T, A); the hook decides block reuse.

    Pass `ts` (the timesteps already on the device) when capturing a CUDA graph: no host copies inside.
    """
    x = noise[0]
    if ts is None:
        ts = torch.tensor(sampler.timesteps, device=obs.device)
    for i in range(sampler.steps):
        if hook is not None:
            hook.step = i
        eps = model(x, ts[i:i + 1], obs, hook)
        x = sampler.step(eps, i, x, noise[i + 1])
    return x


@dataclass(slots=True)
class Normalizer:
    """Per-dimension affine map of observations and actions to [-1, 1]."""

    obs_lo: np.ndarray
    obs_hi: np.ndarray
    act_lo: np.ndarray
    act_hi: np.ndarray

    @classmethod
    def fit(cls, obs: np.ndarray, act: np.ndarray) -> Normalizer:
        o, a = obs.reshape(-1, obs.shape[-1]), act.reshape(-1, act.shape[-1])
        return cls(o.min(0), o.max(0), a.min(0), a.max(0))

    @classmethod
    def from_dict(cls, d: dict) -> Normalizer:
        return cls(**{k: np.asarray(v, np.float32) for k, v in d.items()})

    def to_dict(self) -> dict:
        return {k: np.asarray(getattr(self, k)).tolist() for k in ("obs_lo", "obs_hi", "act_lo", "act_hi")}

    def obs(self, x: np.ndarray) -> np.ndarray:
        return ((x - self.obs_lo) / np.maximum(self.obs_hi - self.obs_lo, 1e-6) * 2 - 1).astype(np.float32)

    def act(self, x: np.ndarray) -> np.ndarray:
        return ((x - self.act_lo) / np.maximum(self.act_hi - self.act_lo, 1e-6) * 2 - 1).astype(np.float32)

    def unact(self, x: np.ndarray) -> np.ndarray:
        return ((x + 1) / 2 * (self.act_hi - self.act_lo) + self.act_lo).astype(np.float32)


class Policy:
    """Observation history → action chunk, optionally under a BAC plan (the cache resets every chunk)."""

    def __init__(self, model: Denoiser, norm: Normalizer, sampler: NoiseSchedule, plan: np.ndarray | None = None) -> None:
        self.model, self.norm, self.sampler, self.plan = model, norm, sampler, plan
        self.device = next(model.parameters()).device
        self.evals = 0

    def act(self, obs: np.ndarray, seed: int) -> np.ndarray:
        cfg = self.model.cfg
        noise = draw_noise(self.sampler, len(obs), cfg.horizon, cfg.act_dim, seed, self.device)
        hook = CacheHook(self.plan) if self.plan is not None else None
        o = torch.from_numpy(self.norm.obs(obs)).to(self.device)
        x = denoise(self.model, self.sampler, o, noise, hook)
        self.evals += hook.evals if hook is not None else cfg.n_blocks * self.sampler.steps
        return self.norm.unact(x.float().cpu().numpy())
