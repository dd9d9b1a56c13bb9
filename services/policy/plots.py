"""Figures for docs/policy.md: similarity matrices, the schedules, and MSE against block evaluations."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def similarity_figure(out: Path, checkpoint: str | None = None) -> Path:
    """Per-block K×K cosine similarity of an uncached DDPM-100 run, a few blocks side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from services.policy import checkpoint as ckpt
    from services.policy import evaluate as ev
    from services.policy.bac import cosine_matrix
    from services.policy.model import block_name
    from services.policy.schedule import ddpm

    model, norm, _ = ckpt.load(checkpoint)
    outs = ev.record(model, norm, ddpm(), ev.eval_obs(16, 11))
    picks = [0, 1, 2, len(outs) // 2, len(outs) - 2, len(outs) - 1]
    fig, axes = plt.subplots(1, len(picks), figsize=(3 * len(picks), 3.2))
    for ax, b in zip(axes, picks, strict=True):
        im = ax.imshow(cosine_matrix(outs[b]), vmin=0, vmax=1, cmap="viridis")
        ax.set_title(block_name(b))
        ax.set_xlabel("step")
    axes[0].set_ylabel("step")
    fig.colorbar(im, ax=axes, shrink=0.8)
    path = out / "policy_similarity.png"
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)
    return path


def schedule_figure(out: Path, schedules: dict, budget: int = 10) -> Path:
    """Update steps per block (rows) for uniform, unified ACS, ACS and BAC at one budget."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from services.policy.bac import plan_from_steps

    plans = schedules["ddpm100"][str(budget)]
    methods = ["uniform", "unified", "acs", "bac"]
    fig, axes = plt.subplots(len(methods), 1, figsize=(10, 2.0 * len(methods)), sharex=True)
    for ax, m in zip(axes, methods, strict=True):
        plan = plan_from_steps(plans[m]["steps"], 100)
        ax.imshow(plan.T, aspect="auto", cmap="Greys", interpolation="nearest")
        ax.set_ylabel("block")
        ax.set_title(f"{m}: {int(plan.sum())} block evaluations (uncached {plan.size})", fontsize=9)
    axes[-1].set_xlabel("denoising step (0 = noisiest)")
    path = out / "policy_schedules.png"
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)
    return path


def tradeoff_figure(out: Path, table: dict) -> Path:
    """Action MSE vs uncached against block evaluations, one marker per method (DDPM-100)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    rows = [r for r in table["rows"] if r["sampler"] == "ddpm100" and r["method"] != "uncached"]
    for m, marker in (("uniform", "o"), ("unified", "s"), ("acs", "^"), ("bac", "*")):
        pts = sorted((r["block_evals"], r["action_mse"]) for r in rows if r["method"] == m)
        if pts:
            ax.plot(*np.asarray(pts).T, marker=marker, label=m)
    ax.set_xlabel("block evaluations per chunk (uncached 1800)")
    ax.set_ylabel("action MSE vs uncached (same noise)")
    ax.set_yscale("log")
    ax.legend()
    ax.grid(alpha=0.3)
    path = out / "policy_tradeoff.png"
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)
    return path


def all_figures(out: Path, table_json: Path, checkpoint: str | None = None) -> list[Path]:
    from services.policy import checkpoint as ckpt

    out.mkdir(parents=True, exist_ok=True)
    table = json.loads(table_json.read_text())
    return [similarity_figure(out, checkpoint), schedule_figure(out, ckpt.load_schedules(checkpoint)),
            tradeoff_figure(out, table)]
