"""Why our H100 split does not beat the colocated H100 baseline: the max load within Splitwise SLOs of
Baseline-H100 (40) and the best iso-power HH split (20 + 20) when one modelling assumption is changed at a time.

Run: python benchmarks/sim_sensitivity.py [--duration 60]
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from services.contracts.layout import Layout, load_layout
from sim import catalog, results
from sim.search import max_rate, split_layout
from sim.trace import load_trace

REPO = Path(__file__).resolve().parents[1]


def _gap(lay: Layout) -> Layout:
    return lay.model_copy(update={"sim": lay.sim.model_copy(update={"tbt_slo_basis": "gap"})})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--duration", type=float, default=60.0)
    a = ap.parse_args()
    base = load_layout(REPO / "examples/sim/splitwise-hh.yaml")
    wl = load_trace("conv")
    designs = {"Baseline-H100 (40)": split_layout(base, "dgx-h100", "dgx-h100", 0, 40),
               "HH 20 + 20": split_layout(base, "dgx-h100", "dgx-h100", 20, 20),
               "HH 25 + 15 (paper)": split_layout(base, "dgx-h100", "dgx-h100", 25, 15)}
    h100 = catalog.HARDWARE["dgx-h100"]
    slo = dict(results.SLOWDOWN_SLO)
    variants = (
        ("as modelled", lambda: None),
        ("2x KV memory per machine", lambda: catalog.HARDWARE.__setitem__(
            "dgx-h100", dataclasses.replace(h100, memory_bytes=2 * h100.memory_bytes - 0.0))),
        ("TBT p50 SLO 1.25x -> 2x", lambda: results.SLOWDOWN_SLO.__setitem__("tbt", (2.0, 2.0, 5.0))),
        ("TBT SLO over every gap, not per-request means (sim.tbt_slo_basis: gap)", lambda: None),
    )
    print("| variant | " + " | ".join(designs) + " |")
    print("|---|" + "---|" * len(designs))
    for label, apply in variants:
        apply()
        try:
            lays = [_gap(lay) if "every gap" in label else lay for lay in designs.values()]
            rates = [max_rate(lay, wl, duration_s=a.duration, lo=5.0) for lay in lays]
        finally:
            catalog.HARDWARE["dgx-h100"] = h100
            results.SLOWDOWN_SLO.clear()
            results.SLOWDOWN_SLO.update(slo)
        print(f"| {label} | " + " | ".join(f"{p.rate:.1f}" if p else "0" for p in rates) + " |", flush=True)


if __name__ == "__main__":
    main()
