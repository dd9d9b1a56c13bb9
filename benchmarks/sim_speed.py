"""Simulated requests per CPU second for one hour of the conversation trace (the table in docs/sim.md).

Run: python benchmarks/sim_speed.py [--layout examples/sim/splitwise-hh.yaml] [--trace conv]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from sim.speed import speed_table

if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--layout", type=Path, default=Path(__file__).resolve().parents[1] / "examples/sim/splitwise-hh.yaml")
    ap.add_argument("--trace", default="conv")
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    print(speed_table(a.layout, a.trace, a.repeats))
