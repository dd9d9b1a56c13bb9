"""Figures for docs/dlm.md from the bench and timing JSON: `tandem dlm plots BENCH TIMING... OUTDIR`."""

from __future__ import annotations

import json
from pathlib import Path


def bench_figure(bench: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in ("baseline", "freecache", "freecache_lag", "refresh_block", "guided",
                                  "freecache_guided") if n in bench]
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
    x = range(len(names))
    ax[0].bar([i - 0.2 for i in x], [bench[n]["linear_work_reduction"] for n in names], 0.4, label="linear work")
    ax[0].bar([i + 0.2 for i in x], [bench[n]["speedup"] for n in names], 0.4, label="wall clock")
    ax[0].axhline(bench["config"]["formula_linear_work_reduction"], ls="--", c="gray", label="FreeCache formula")
    ax[0].set_xticks(list(x), names, rotation=20)
    ax[0].set_ylabel("x vs baseline")
    ax[0].set_yscale("log")
    ax[0].legend()
    acc = [bench[n]["accuracy"] for n in names]
    err = [[max(0.0, a - bench[n]["accuracy_ci95"][0]) for a, n in zip(acc, names, strict=True)],
           [max(0.0, bench[n]["accuracy_ci95"][1] - a) for a, n in zip(acc, names, strict=True)]]
    ax[1].bar(list(x), acc, yerr=err, capsize=4)
    ax[1].set_xticks(list(x), names, rotation=20)
    ax[1].set_ylim(0, 1.05)
    ax[1].set_ylabel(f"exact-match accuracy (n={bench['config']['n']}, 95% CI)")
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def timing_figure(timings: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # batch-1 eager rows only; the batch / CUDA-graph study has its own figure (scaling_figure)
    timings = [{**t, "rows": [r for r in t["rows"] if r.get("batch", 1) == 1 and not r.get("graphs")]}
               for t in timings]
    timings = [t for t in timings if t["rows"]]
    fig, axes = plt.subplots(1, len(timings), figsize=(5.5 * len(timings), 3.8), squeeze=False)
    for ax, t in zip(axes[0], timings, strict=True):
        cases = sorted({(r["prompt"], r["gen"], r["block"]) for r in t["rows"]})
        variants = list(dict.fromkeys(r["variant"] for r in t["rows"]))
        w = 0.8 / len(variants)
        for j, v in enumerate(variants):
            ys = [next(r["speedup"] for r in t["rows"] if (r["prompt"], r["gen"], r["block"]) == c and
                       r["variant"] == v) for c in cases]
            ax.bar([i + j * w for i in range(len(cases))], ys, w, label=v)
        ax.set_xticks([i + 0.4 - w / 2 for i in range(len(cases))], [f"P={p} G={g} B={b}" for p, g, b in cases])
        ax.set_yscale("log")
        ax.set_ylabel("wall-clock speed-up vs baseline")
        ax.set_title(f"{t['device']} ({t['params'] / 1e6:.0f}M params, {t['dtype'].split('.')[-1]})", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def scaling_figure(timings: list[dict], out: Path) -> None:
    """FreeCache's wall-clock speed-up over the baseline against batch size, eager vs CUDA graphs, per prompt
    length, next to the formula: where the saved arithmetic shows up in time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(t, r) for t in timings for r in t["rows"] if r["variant"] == "freecache" and "batch" in r]
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(6.5, 4))
    series: dict[tuple, list[tuple[int, float]]] = {}
    for t, r in rows:
        cudnn = "cuDNN attn on" if t.get("cudnn_sdpa", True) else "cuDNN attn off"
        mode = "CUDA graphs" if r["graphs"] else "eager"
        series.setdefault((r["prompt"], mode, cudnn), []).append((r["batch"], r["speedup"]))
    for i, p in enumerate(sorted({k[0] for k in series})):
        color = f"C{i}"
        formula = next(r["formula"] for _, r in rows if r["prompt"] == p)
        ax.axhline(formula, ls=":", lw=1, color=color)
        for (pp, mode, cudnn), pts in sorted(series.items()):
            if pp == p:
                pts.sort()
                style = ("o-" if "off" in cudnn else "^-") if mode == "CUDA graphs" else "s--"
                ax.plot([b for b, _ in pts], [s for _, s in pts], style, color=color,
                        alpha=1.0 if mode == "CUDA graphs" else 0.6, label=f"P={p}, {mode}, {cudnn}")
        ax.text(1, formula * 1.03, f"formula P={p}: {formula:.2f}x", fontsize=7, color=color)
    ax.axhline(1, c="gray", lw=0.5)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("prompts per batch")
    ax.set_ylabel("FreeCache wall-clock speed-up vs baseline")
    ax.set_title(f"{rows[0][0]['device']}, {rows[0][0]['params'] / 1e6:.0f}M-param DLM, G=256, B=32", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def bench_markdown(bench: dict) -> str:
    rows = ["| variant | accuracy [95% CI] | per task (add/rev/sort) | token agreement | DLM forwards | "
            "tokens/step | linear work | seconds | speed-up |", "|" + "---|" * 9]
    names = [n for n in ("baseline", "freecache", "freecache_lag", "refresh_block", "guided",
                         "freecache_guided", "parallel") if n in bench]
    for n in names:
        r = bench[n]
        lo, hi = r["accuracy_ci95"]
        per = "/".join(f"{v:.3f}" for v in r["accuracy_by_task"].values())
        rows.append(f"| {n} | {r['accuracy']:.3f} [{lo:.3f}, {hi:.3f}] | {per} | {r['token_agreement']:.4f} | "
                    f"{r['forward_passes']:.1f} | {r['tokens_per_step']:.2f} | {r['linear_work_reduction']:.2f}x | "
                    f"{r['seconds']:.1f} | {r['speedup']:.2f}x |")
    return "\n".join(rows)


def timing_markdown(t: dict) -> str:
    batched = any("batch" in r for r in t["rows"])
    cudnn = "" if t.get("cudnn_sdpa") is None else f", cuDNN attention {'on' if t['cudnn_sdpa'] else 'off'}"
    head = "| P | G | B | variant | " + ("batch | graphs | " if batched else "") + \
        "seconds | speed-up | DLM forwards | DLM positions | linear work | formula |"
    rows = [f"{t['device']}, {t['dtype']}, DLM {t['params'] / 1e6:.0f}M params, guide {t['guide_params'] / 1e6:.0f}M{cudnn}",
            "", head, "|" + "---|" * (len(head.split("|")) - 2)]
    for r in t["rows"]:
        mode = f"{r['batch']} | {'yes' if r['graphs'] else 'no'} | " if batched else ""
        speed = f"{r['speedup']:.2f}x" if "speedup" in r else "n/a"
        rows.append(f"| {r['prompt']} | {r['gen']} | {r['block']} | {r['variant']} | {mode}{r['seconds']:.3f} | "
                    f"{speed} | {r['forward_passes']} | {r['dlm_tokens']} | "
                    f"{r.get('linear_work_reduction', float('nan')):.2f}x | {r['formula']:.2f}x |")
    return "\n".join(rows)


def render(bench: Path, timings: list[Path], outdir: Path) -> None:
    """The three figures into OUTDIR, and the markdown tables on stdout."""
    outdir.mkdir(parents=True, exist_ok=True)
    b = json.loads(Path(bench).read_text())
    ts = [json.loads(Path(t).read_text()) for t in timings]
    bench_figure(b, outdir / "dlm_bench_cpu.png")
    timing_figure(ts, outdir / "dlm_timing.png")
    scaling_figure(ts, outdir / "dlm_freecache_scaling.png")
    print(bench_markdown(b))
    for t in ts:
        print()
        print(timing_markdown(t))
