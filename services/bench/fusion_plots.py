"""Plots of a fusion benchmark JSON: tokens/s and p50/p99 latency against the arrival rate, one line per policy."""

from __future__ import annotations

from pathlib import Path

from services.batching.scheduler import MODES

STYLE = {"fusion": ("tab:green", "o"), "static": ("tab:orange", "s"), "sequential": ("tab:gray", "^")}


def plot(result: dict, out_png: str | Path, title: str | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    runs = sorted(result["runs"], key=lambda r: r["rate_rps"])
    rates = [r["rate_rps"] for r in runs]
    fig, (ax_t, ax_l) = plt.subplots(1, 2, figsize=(11, 4))
    if len(runs) == 1:  # one rate: bars read better than single points
        run = runs[0]
        colors = [STYLE[p][0] for p in MODES]
        ax_t.bar(MODES, [run[p]["tokens_per_s"] for p in MODES], color=colors)
        x = range(len(MODES))
        ax_l.bar([i - 0.2 for i in x], [run[p]["latency_p50_s"] for p in MODES], 0.4, color=colors, label="p50")
        ax_l.bar([i + 0.2 for i in x], [run[p]["latency_p99_s"] for p in MODES], 0.4, color=colors, alpha=0.5,
                 hatch="//", label="p99")
        ax_l.set_xticks(list(x), MODES)
        ax_t.set(ylabel="output tokens/s", title=f"throughput at {run['rate_rps']:.1f} requests/s")
        ax_l.set(ylabel="per-request latency (s)", title="latency p50 (solid) / p99 (hatched)")
        ax_l.legend(fontsize=8)
        return _save(fig, result, out_png, title)
    for p in MODES:
        color, marker = STYLE[p]
        ax_t.plot(rates, [r[p]["tokens_per_s"] for r in runs], color=color, marker=marker, label=p)
        ax_l.plot(rates, [r[p]["latency_p50_s"] for r in runs], color=color, marker=marker, label=f"{p} p50")
        ax_l.plot(rates, [r[p]["latency_p99_s"] for r in runs], color=color, marker=marker, ls="--", label=f"{p} p99")
    ax_t.set(xlabel="arrival rate (requests/s)", ylabel="output tokens/s", title="throughput")
    ax_l.set(xlabel="arrival rate (requests/s)", ylabel="per-request latency (s)", title="latency", yscale="log")
    for ax in (ax_t, ax_l):
        ax.set_xscale("log")
        ax.set_xticks(rates, [f"{r:.2g}" for r in rates])  # the measured rates, not log-axis decades
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, result, out_png, title)


def _save(fig, result: dict, out_png: str | Path, title: str | None) -> Path:
    import matplotlib.pyplot as plt

    fig.suptitle(title or f"{result['model']} on {result['device']} ({result['dtype']}), "
                 f"{len(result['max_tokens'])} requests, max batch {result['config']['max_batch']}")
    fig.tight_layout()
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out

