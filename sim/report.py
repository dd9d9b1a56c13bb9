"""`tandem sim report`: latency CDFs, throughput vs load and the cost/power frontier of several layouts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from services.contracts.layout import Layout, load_layout
from sim.cluster import simulate
from sim.parallel import fan_out
from sim.results import summarize_run
from sim.search import max_rate
from sim.trace import Workload, load_trace, synthetic


def _cdf(ax: object, values: np.ndarray, label: str) -> None:
    v = np.sort(values[~np.isnan(values)])
    if v.size:
        ax.plot(v, np.arange(1, v.size + 1) / v.size, label=label)  # type: ignore[attr-defined]


SWEEP_KEYS = ("throughput_rps", "throughput_window_rps", "slo_attainment", "ttft_p99_s", "tbt_p99_s",
              "tbt_mean_p50_s", "slowdown_slo_met", "power_mean_w")


def _unit(kind: str, lay: Layout, base: Workload, rate: float, duration_s: float, seed: int,
          lo: float) -> tuple[dict, tuple | None]:
    """One independent piece of a report: the run at the CDF rate (with its latencies), one sweep point, or the
    max-load bisection."""
    if kind == "max":
        probe = max_rate(lay, base, duration_s=duration_s, seed=seed, lo=lo)
        return ({"max_rate_rps": probe.rate, "result": probe.result} if probe else {"max_rate_rps": 0.0}), None
    run = simulate(lay, synthetic(base, rate=rate, duration_s=duration_s, seed=seed))
    res = summarize_run(run)
    if kind == "sweep":
        return {"rate": rate, **{k: res[k] for k in SWEEP_KEYS}}, None
    r = run.reqs
    done = ~np.isnan(r.finish)
    ttft = r.first_tok[done] - r.arrival[done]
    e2e = r.finish[done] - r.arrival[done]
    multi = r.output[done] > 1
    tbt = (r.finish[done][multi] - r.first_tok[done][multi]) / (r.output[done][multi] - 1)
    return res, (ttft, tbt, e2e)


def make_report(layouts: list[Path], *, trace: str, rate: float, rates: list[float], duration_s: float,
                seed: int, out_dir: Path, prefix: str = "sim_", json_out: Path | None = None, jobs: int = 1,
                ray_address: str | None = None) -> str:
    """Writes {prefix}cdf.png, {prefix}throughput.png and {prefix}frontier.png into out_dir (and every number
    into `json_out` when given); returns a markdown table of the frontier. The simulations run in parallel with
    jobs > 1 (or on Ray); the numbers are the same."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from rich.progress import Progress

    out_dir.mkdir(parents=True, exist_ok=True)
    base = load_trace(trace)
    lays = [load_layout(p) for p in layouts]
    report: dict = {"trace": trace, "rate": rate, "rates": rates, "duration_s": duration_s, "seed": seed,
                    "layouts": {}}
    lo = max(1.0, min(rates) / 2)
    calls = []
    for lay in lays:
        calls.append(("at", lay, base, rate, duration_s, seed, lo))
        calls += [("sweep", lay, base, x, duration_s, seed, lo) for x in rates]
        calls.append(("max", lay, base, rate, duration_s, seed, lo))
    with Progress(transient=True) as bar:
        task = bar.add_task("report", total=len(calls))
        out = fan_out(_unit, calls, jobs=jobs, ray_address=ray_address, progress=lambda _i: bar.advance(task))
    fig_cdf, axes_cdf = plt.subplots(1, 3, figsize=(15, 4))
    fig_tp, axes_tp = plt.subplots(1, 2, figsize=(12, 4))
    per = len(rates) + 2
    for li, lay in enumerate(lays):
        mine = out[li * per:(li + 1) * per]
        at_rate, lat = mine[0]
        for ax, vals in zip(axes_cdf, lat, strict=True):
            _cdf(ax, vals, lay.name)
        sweep = [s for s, _ in mine[1:-1]]
        xs = [s["rate"] for s in sweep]
        axes_tp[0].plot(xs, [s["slo_attainment"] * s["rate"] for s in sweep], marker="o", label=lay.name)
        axes_tp[1].plot(xs, [s["ttft_p99_s"] for s in sweep], marker="o", label=lay.name)
        best = mine[-1][0]
        res = best.get("result", at_rate)
        report["layouts"][lay.name] = {
            "at_rate": at_rate, "sweep": sweep, "max_rate_rps": best["max_rate_rps"],
            "cost_per_hour": res["cost_per_hour"], "power_provisioned_w": res["power_provisioned_w"],
            "power_mean_w_at_max": res["power_mean_w"], "energy_per_token_j_at_max": res["energy_per_token_j"]}
    for ax, title in zip(axes_cdf, ("TTFT (s)", "per-request mean TBT (s)", "E2E (s)"), strict=True):
        ax.set_xlabel(title)
        ax.set_ylabel("CDF")
        ax.grid(alpha=0.3)
    axes_cdf[2].set_xscale("log")
    axes_cdf[0].legend(fontsize=8)
    fig_cdf.suptitle(f"Latency CDFs at {rate:g} req/s ({trace} sizes, Poisson, {duration_s:g} s)")
    fig_cdf.tight_layout()
    fig_cdf.savefig(out_dir / f"{prefix}cdf.png", dpi=110)
    axes_tp[0].set_xlabel("offered load (req/s)")
    axes_tp[0].set_ylabel("goodput: req/s meeting the layout SLO")
    axes_tp[1].set_xlabel("offered load (req/s)")
    axes_tp[1].set_ylabel("TTFT p99 (s)")
    axes_tp[1].set_yscale("log")
    for ax in axes_tp:
        ax.grid(alpha=0.3)
    axes_tp[0].legend(fontsize=8)
    fig_tp.tight_layout()
    fig_tp.savefig(out_dir / f"{prefix}throughput.png", dpi=110)
    fig_fr, axes_fr = plt.subplots(1, 2, figsize=(12, 4))
    for name, e in report["layouts"].items():
        axes_fr[0].scatter(e["cost_per_hour"], e["max_rate_rps"])
        axes_fr[0].annotate(name, (e["cost_per_hour"], e["max_rate_rps"]), fontsize=8)
        axes_fr[1].scatter(e["power_provisioned_w"] / 1e3, e["max_rate_rps"])
        axes_fr[1].annotate(name, (e["power_provisioned_w"] / 1e3, e["max_rate_rps"]), fontsize=8)
    axes_fr[0].set_xlabel("cost ($/h)")
    axes_fr[1].set_xlabel("provisioned power (kW)")
    for ax in axes_fr:
        ax.set_ylabel("max load within Splitwise SLOs (req/s)")
        ax.grid(alpha=0.3)
    fig_fr.tight_layout()
    fig_fr.savefig(out_dir / f"{prefix}frontier.png", dpi=110)
    plt.close("all")
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(report, indent=2, default=float) + "\n")
    lines = ["| layout | max req/s within SLO | $/h | provisioned kW | req/s per $/h x100 | "
             "mean kW at max | J/token at max |", "|---|---|---|---|---|---|---|"]
    for name, e in report["layouts"].items():
        lines.append(f"| {name} | {e['max_rate_rps']:.1f} | {e['cost_per_hour']:.0f} | "
                     f"{e['power_provisioned_w'] / 1e3:.0f} | {100 * e['max_rate_rps'] / e['cost_per_hour']:.2f} | "
                     f"{e['power_mean_w_at_max'] / 1e3:.0f} | {e['energy_per_token_j_at_max']:.1f} |")
    return "\n".join(lines)
