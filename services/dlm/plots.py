"""Figures for docs/dlm.md from the bench and timing JSON: `python -m services.dlm.plots BENCH TIMING... OUTDIR`."""

from __future__ import annotations

import json
import sys
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
    rows = [f"{t['device']}, {t['dtype']}, DLM {t['params'] / 1e6:.0f}M params, guide {t['guide_params'] / 1e6:.0f}M", "",
            "| P | G | B | variant | seconds | speed-up | DLM forwards | DLM positions | linear work | formula |",
            "|" + "---|" * 10]
    for r in t["rows"]:
        rows.append(f"| {r['prompt']} | {r['gen']} | {r['block']} | {r['variant']} | {r['seconds']:.3f} | "
                    f"{r['speedup']:.2f}x | {r['forward_passes']} | {r['dlm_tokens']} | "
                    f"{r['linear_work_reduction']:.2f}x | {r['formula']:.2f}x |")
    return "\n".join(rows)


def main() -> None:
    bench, *timings, outdir = sys.argv[1:]
    outdir = Path(outdir)
    b = json.loads(Path(bench).read_text())
    ts = [json.loads(Path(t).read_text()) for t in timings]
    bench_figure(b, outdir / "dlm_bench_cpu.png")
    timing_figure(ts, outdir / "dlm_timing.png")
    print(bench_markdown(b))
    for t in ts:
        print()
        print(timing_markdown(t))


if __name__ == "__main__":
    main()
