"""Train the denoiser on scripted-expert demonstrations: `tandem policy train --out DIR`.

Imports only torch/numpy and this package, so it runs on the bare GPU box as well as here.
"""

from __future__ import annotations

import copy
import math
import time

import numpy as np
import torch

from services.policy import task
from services.policy.model import Denoiser, DenoiserConfig
from services.policy.sampler import Normalizer
from services.policy.schedule import TRAIN_STEPS, add_noise, alphas_cumprod


def train(cfg: DenoiserConfig, episodes: int, seconds: float, max_steps: int, batch: int, lr: float,
          device: str, seed: int = 0, log_every: int = 500) -> tuple[Denoiser, Normalizer, dict]:
    """ε-prediction MSE with AdamW, cosine LR and an EMA copy (the EMA weights are returned)."""
    torch.manual_seed(seed)
    obs, act = task.demonstrations(episodes, cfg.horizon, seed=seed)
    norm = Normalizer.fit(obs, act)
    o = torch.from_numpy(norm.obs(obs)).to(device)
    a = torch.from_numpy(norm.act(act)).to(device)
    model = Denoiser(cfg).to(device).train()
    ema = copy.deepcopy(model).eval()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-3)
    abar = torch.tensor(alphas_cumprod(TRAIN_STEPS), dtype=torch.float32, device=device)
    start, step, losses = time.time(), 0, []
    while step < max_steps and time.time() - start < seconds:
        frac = min(1.0, (time.time() - start) / seconds, step / max_steps)
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, step / 500) * 0.5 * (1 + math.cos(math.pi * frac))
        idx = torch.randint(0, len(o), (batch,), device=device)
        x0, cond = a[idx], o[idx]
        noise = torch.randn_like(x0)
        t = torch.randint(0, TRAIN_STEPS, (batch,), device=device)
        loss = torch.nn.functional.mse_loss(model(add_noise(x0, noise, t, abar), t, cond), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        decay = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters(), strict=True):
                pe.lerp_(pm, 1 - decay)
        losses.append(loss.item() if step % 50 == 0 else losses[-1] if losses else loss.item())
        if step % log_every == 0:
            print(f"step {step} loss {np.mean(losses[-50:]):.4f} {time.time() - start:.0f}s", flush=True)
        step += 1
    info = {"train": {"steps": step, "seconds": round(time.time() - start, 1), "episodes": episodes,
                      "samples": len(o), "batch": batch, "lr": lr, "final_loss": float(np.mean(losses[-200:]))}}
    return ema.cpu(), norm, info

