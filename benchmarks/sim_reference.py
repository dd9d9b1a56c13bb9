"""Our simulator next to splitwise-sim on one trace file (the comparison table in docs/sim.md).

Run: python benchmarks/sim_reference.py REF_CHECKOUT --python REF_VENV/bin/python [--designs baseline-h100,splitwise-hh]
REF_CHECKOUT is a checkout of splitwise-sim (github.com/Mutinifni/splitwise-sim) with its requirements installed in
the Python given by --python (its own environment: hydra, pandas, scipy, networkx); nothing of it is copied here.
The trace is drawn once by its generate_trace.py (seeded) from our copy of the Azure conversation trace and fed
to both; a tandem-local copy of its config.yaml without the hardwired Ray launcher is written into its configs/.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from sim.reference import DESIGNS, compare, table

if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("reference", type=Path, help="splitwise-sim checkout")
    ap.add_argument("--python", default="python", help="the Python with splitwise-sim's requirements")
    ap.add_argument("--designs", default=",".join(DESIGNS))
    ap.add_argument("--rate", type=float, default=70.0)
    ap.add_argument("--duration", type=float, default=120.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-hypotheses", action="store_true", help="only our defaults and all of its choices")
    ap.add_argument("--json", type=Path, help="write every number here")
    a = ap.parse_args()
    res = compare(a.reference.resolve(), a.python, a.designs.split(","), rate=a.rate, duration_s=a.duration,
                  seed=a.seed, hypotheses=not a.no_hypotheses)
    print(f"trace: {res['trace']} (Poisson {a.rate:g} req/s for {a.duration:g} s, seed {a.seed})\n")
    print(table(res))
    if a.json:
        a.json.write_text(json.dumps(res, indent=1))
