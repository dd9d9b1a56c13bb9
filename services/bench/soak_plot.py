"""The soak's plot: RSS per process, KV in use per decode worker, and streams in flight, over time."""

from __future__ import annotations

from pathlib import Path


def plot(result: dict, out_png: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = result["samples"]
    t = [s["t_s"] for s in samples]
    fig, (ax_rss, ax_kv, ax_in) = plt.subplots(3, 1, figsize=(10, 9), sharex=True)
    for name in samples[0]["rss"]:
        ax_rss.plot(t, [None if s["rss"][name] is None else s["rss"][name] / 2**20 for s in samples], label=name)
    for name in samples[0]["kv_in_use"]:
        ax_kv.plot(t, [None if s["kv_in_use"][name] is None else s["kv_in_use"][name] / 2**20 for s in samples],
                   label=name)
    ax_in.plot(t, [s["client_inflight"] for s in samples], label="streams in flight (client)")
    ax_in.plot(t, [s["gateway_inflight"] for s in samples], label="requests in flight (gateway)", alpha=0.7)
    ax_rss.set(ylabel="RSS (MiB)", title="resident memory per process")
    ax_rss.set_ylim(bottom=0)
    ax_kv.set(ylabel="KV in use (MiB)", title="decode workers' KV budget in use (Info: total - free)")
    ax_in.set(ylabel="in flight", xlabel="time (s)", title="concurrency")
    for ax in (ax_rss, ax_kv, ax_in):
        ax.axvspan(result["load_start_s"], result["load_end_s"], color="tab:gray", alpha=0.08)
        ax.axvline(result["load_end_s"], color="tab:gray", ls="--", lw=1)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper right")
    c = result["config"]
    fig.suptitle(f"tandem bench soak: {c['streams']} streams x {c['duration_s']:.0f} s, {result['completed']} "
                 f"completed, {result['unexpected']} unexpected errors (shaded: load; dashed: load over)")
    fig.tight_layout()
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
