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

    from services.bench import policy_evaluate as ev
    from services.policy import checkpoint as ckpt
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
    """MSE vs uncached and rollout success against block evaluations, one line per method (DDPM-100)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    rows = [r for r in table["rows"] if r["sampler"] == "ddpm100"]
    base = next(r for r in rows if r["method"] == "uncached")
    for m, marker in (("uniform", "o"), ("unified", "s"), ("acs", "^"), ("bac", "*"), ("bac-n9", "P"),
                      ("bac-n17", "X")):
        pts = sorted((r["block_evals"], r["action_mse"], r["success_rate"], *r["success_ci95"])
                     for r in rows if r["method"] == m)
        if not pts:
            continue
        ev, mse, succ, lo, hi = np.asarray(pts).T
        ax1.plot(ev, mse, marker=marker, label=m)
        ax2.errorbar(ev, succ, yerr=[succ - lo, hi - succ], marker=marker, capsize=3, label=m)
    ax2.axhspan(*base["success_ci95"], color="grey", alpha=0.25, label="uncached 95% CI")
    ax1.set_yscale("log")
    ax1.set_ylabel("action MSE vs uncached (same noise)")
    ax2.set_ylabel("rollout success rate")
    for ax in (ax1, ax2):
        ax.set_xlabel(f"block evaluations per chunk (uncached {base['block_evals']})")
        ax.grid(alpha=0.3)
    ax2.legend(fontsize=8)
    path = out / "policy_tradeoff.png"
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)
    return path


def merge_tables(tables: list[dict]) -> dict:
    """Rows of several runs on one checkpoint (same scenes and noise); a config's first row wins."""
    seen, rows = set(), []
    for t in tables:
        for r in t["rows"]:
            if r["config"] not in seen:
                seen.add(r["config"])
                rows.append(r)
    return {"rows": rows}


def all_figures(out: Path, table_json: Path | list[Path], checkpoint: str | None = None) -> list[Path]:
    from services.policy import checkpoint as ckpt

    out.mkdir(parents=True, exist_ok=True)
    paths = table_json if isinstance(table_json, list) else [table_json]
    table = merge_tables([json.loads(p.read_text()) for p in paths])
    return [similarity_figure(out, checkpoint), schedule_figure(out, ckpt.load_schedules(checkpoint)),
            tradeoff_figure(out, table)]


def markdown_table(table: dict) -> str:
    """The benchmark rows as a Markdown table (what docs/policy.md shows)."""
    graph = any("seconds_graph" in r for r in table["rows"])
    best = all("seconds_min" in r for r in table["rows"])
    runs = any("run" in r for r in table["rows"])
    head = ["config", *(["run"] if runs else []), "block evals", "saved", "MSE vs uncached", "MSE held-out",
            "success [95% CI]", "crash", "ms/chunk (eager)", "speed-up"]
    if best:
        head += ["min ms/chunk", "speed-up (min)"]
    if graph:
        head += ["ms/chunk (graph)", "speed-up (graph)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in table["rows"]:
        lo, hi = r["success_ci95"]
        cells = [r["config"], *([str(r.get("run", "–"))] if runs else []), str(r["block_evals"]), f"{r['evals_saved']:.0%}", f"{r['action_mse']:.1e}",
                 f"{r['action_mse_heldout']:.1e}", f"{r['success_rate']:.3f} [{lo:.3f}, {hi:.3f}]",
                 f"{r['crash_rate']:.3f}" if "crash_rate" in r else "–",
                 f"{r['seconds'] * 1e3:.1f}", f"{r['speedup']:.2f}x"]
        if best:
            cells += [f"{r['seconds_min'] * 1e3:.1f}", f"{r['speedup_min']:.2f}x"]
        if graph:
            cells += [f"{r['seconds_graph'] * 1e3:.2f}", f"{r['speedup_graph']:.2f}x"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
