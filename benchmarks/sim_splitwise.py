"""Splitwise's iso-power design study on the conversation trace: every split of a power budget into prompt and
token machines, against the colocated baselines. Writes docs/results/sim/sim_iso_power.png and prints the tables in
docs/sim.md.

Run: python benchmarks/sim_splitwise.py [--duration 60] [--step 5] [--out docs/results/sim/sim_iso_power.png]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rich.progress import Progress

from services.contracts.layout import load_layout
from sim.reference import SPLITWISE_ALL, with_settings
from sim.search import best_under_budget

REPO = Path(__file__).resolve().parents[1]
# (label, prompt hw, token hw, power budget W, token-machine cap W): 40 DGX-H100 = 408 kW, 70 DGX-A100 = 455 kW
FAMILIES = (
    ("HH (H100 prompt + H100 token), 408 kW", "dgx-h100", "dgx-h100", 408_000, None),
    ("HHcap (token H100 capped at 70%), 408 kW", "dgx-h100", "dgx-h100", 408_000, 7140.0),
    ("HA (H100 prompt + A100 token), 408 kW", "dgx-h100", "dgx-a100", 408_000, None),
    ("AA (A100 prompt + A100 token), 455 kW", "dgx-a100", "dgx-a100", 455_000, None),
)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trace", default="conv")
    ap.add_argument("--duration", type=float, default=60.0)
    ap.add_argument("--step", type=int, default=5)
    ap.add_argument("--out", type=Path, default=REPO / "docs/results/sim/sim_iso_power.png")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--tbt-basis", choices=("request", "gap"), default="request",
                    help="TBT SLO over per-request mean gaps (splitwise-sim) or every gap")
    ap.add_argument("--jobs", type=int, default=1, help="designs probed at once (local processes)")
    ap.add_argument("--splitwise-choices", action="store_true",
                    help="with splitwise-sim's modelling choices (sim/reference.py SPLITWISE_ALL)")
    a = ap.parse_args()
    base = load_layout(REPO / "examples/sim/splitwise-hh.yaml")
    if a.splitwise_choices:
        base = with_settings(base, SPLITWISE_ALL)
    base = base.model_copy(update={"sim": base.sim.model_copy(update={"tbt_slo_basis": a.tbt_basis})})
    results = {}
    with Progress(transient=True) as bar:
        task = bar.add_task("designs", total=None)
        for label, php, thw, budget, cap in FAMILIES:
            results[label] = best_under_budget(base, a.trace, php, thw, "power", budget, duration_s=a.duration,
                                               step=a.step, decode_cap_w=cap,
                                               progress=lambda n, _total: bar.update(task, advance=1, description=n),
                                               jobs=a.jobs)
    if a.json:
        a.json.write_text(json.dumps(results, indent=2) + "\n")
    _plot(results, a.out, a.tbt_basis)
    print("| family | best design | max req/s | $/h | colocated baseline of the budget | its req/s | ratio |")
    print("|---|---|---|---|---|---|---|")
    for label, rows in results.items():
        split = [r for r in rows if r["name"].startswith("split")]
        colo = [r for r in rows if r["name"].startswith("baseline")]
        best, ref = split[0], max(colo, key=lambda r: r["max_rate_rps"])
        print(f"| {label} | {best['name']} | {best['max_rate_rps']:.1f} | {best['cost_per_hour']:.0f} | "
              f"{ref['name']} | {ref['max_rate_rps']:.1f} | {best['max_rate_rps'] / ref['max_rate_rps']:.2f}x |")


def _plot(results: dict, out: Path, basis: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for label, rows in results.items():
        pts = sorted((r["pools"][0][1], r["max_rate_rps"]) for r in rows if r["name"].startswith("split"))
        line, = ax.plot([p for p, _ in pts], [y for _, y in pts], marker="o", label=label)
        for r in rows:
            if r["name"].startswith("baseline"):
                ax.axhline(r["max_rate_rps"], color=line.get_color(), ls=":", lw=1)
                ax.annotate(r["name"], (5, r["max_rate_rps"]), fontsize=7, color=line.get_color(),
                            xytext=(0, 2), textcoords="offset points")
    ax.set_xlabel("prompt machines (the rest of the power budget buys token machines)")
    ax.set_ylabel("max load within Splitwise SLOs (req/s)")
    ax.set_title(f"Iso-power designs, BLOOM-176B, conv sizes, TBT SLO per {basis} (dotted: colocated)",
                 fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


if __name__ == "__main__":
    main()
