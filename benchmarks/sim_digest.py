"""A digest of everything a simulation computes, for checking that a change to the simulator's code (a speed-up)
left every simulated number as it was: run it in two checkouts and compare the lines.

For each shipped design (examples/sim/*.yaml), with our defaults and with all of splitwise-sim's choices
(sim/reference.py SPLITWISE_ALL), on a fixed-seed Poisson trace with sizes drawn from the conversation trace, it
hashes the per-request timelines (first token, first gap, finish, tokens, placement, rejections) and the tallies
(every TBT gap sample, busy span, energy, peak power) bit for bit, and prints the hash and a few summary numbers.

Run: python benchmarks/sim_digest.py [--rate 70] [--duration 120] [--seed 0] [--trace conv]
"""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

import numpy as np

from services.contracts.layout import load_layout
from sim.cluster import simulate
from sim.reference import SPLITWISE_ALL, with_settings
from sim.results import summarize_run
from sim.trace import load_trace, synthetic

REPO = Path(__file__).resolve().parents[1]
COLUMNS = ("first_tok", "first_gap", "finish", "gen", "rejected", "dest", "prefill_on")


def digest(run) -> str:
    h = hashlib.sha256()
    for col in COLUMNS:
        h.update(np.ascontiguousarray(getattr(run.reqs, col)).tobytes())
    tally = run.tally
    h.update(np.asarray(tally.gap_values, dtype=np.float64).tobytes())
    h.update(np.asarray(tally.gap_weights, dtype=np.float64).tobytes())
    if hasattr(tally, "spans"):  # busy spans as power steps (t0, t1, ...; +w, -w, ...)
        spans = np.asarray(tally.spans, dtype=np.float64).reshape(-1, 3)
        steps_t, steps_w = spans[:, :2].ravel(), np.column_stack((spans[:, 2], -spans[:, 2])).ravel()
    else:  # a checkout from before the tally kept spans (compare against it too)
        steps_t, steps_w = np.asarray(tally.power_t), np.asarray(tally.power_dw)
    h.update(steps_t.tobytes())
    h.update(steps_w.tobytes())
    h.update(repr((tally.busy_energy_j, tally.events, tally.peak_above_idle())).encode())
    return h.hexdigest()[:16]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trace", default="conv")
    ap.add_argument("--rate", type=float, default=70.0)
    ap.add_argument("--duration", type=float, default=120.0)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    wl = synthetic(load_trace(a.trace), rate=a.rate, duration_s=a.duration, seed=a.seed)
    print(f"{len(wl)} requests, {a.trace} sizes, Poisson {a.rate:g} req/s for {a.duration:g} s, seed {a.seed}")
    for path in sorted((REPO / "examples/sim").glob("*.yaml")):
        base = load_layout(path)
        for label, layout in (("defaults", base), ("splitwise-sim's choices", with_settings(base, SPLITWISE_ALL))):
            run = simulate(layout, wl)
            s = summarize_run(run)
            print(f"{path.stem:16s} {label:24s} {digest(run)}  TTFT p50 {s['ttft_p50_s']!r}  "
                  f"TBT p50 {s['tbt_p50_s']!r}  E2E p99 {s['e2e_p99_s']!r}")


if __name__ == "__main__":
    main()
