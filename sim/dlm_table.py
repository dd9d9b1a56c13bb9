"""The docs/sim.md dlm-pool table: `python -m sim.dlm_table [LAYOUT] [--rate R]` simulates the layout's dlm pool
for two sampler variants and one or two machines and prints a markdown table."""

from __future__ import annotations

import argparse

from services.contracts.layout import load_layout, parse_layout
from sim.cluster import simulate
from sim.results import summarize_run
from sim.trace import make_workload


def rows(layout_path: str, rate: float, duration_s: float, trace: str, seed: int) -> list[str]:
    base = load_layout(layout_path).model_dump()
    dlm_pool = next(i for i, p in enumerate(base["pools"]) if p["role"] == "dlm")
    out = ["| dlm variant | dlm machines | latency p50 s | p99 s | utilization | $/1M requests | J/request |",
           "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    wl = make_workload(trace, rate=rate, duration_s=duration_s, seed=seed)
    for variant in ("baseline", "freecache_guided"):
        for count in (1, 2):
            doc = {**base, "sim": {**base["sim"], "dlm_variant": variant}}
            doc["pools"] = [dict(p) for p in base["pools"]]
            doc["pools"][dlm_pool]["count"] = count
            d = summarize_run(simulate(parse_layout(doc), wl))["dlm"]
            out.append(f"| {variant} | {count} | {d['latency_p50_s']:.3f} | {d['latency_p99_s']:.3f} | "
                       f"{d['utilization']:.2f} | {d['cost_per_million_requests']:.2f} | "
                       f"{d['energy_per_request_j']:.1f} |")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m sim.dlm_table", description=__doc__.splitlines()[0])
    ap.add_argument("layout", nargs="?", default="examples/local-dlm.yaml")
    ap.add_argument("--rate", type=float, default=20.0)
    ap.add_argument("--duration", type=float, default=60.0)
    ap.add_argument("--trace", default="fixed:64:32")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    print("\n".join(rows(a.layout, a.rate, a.duration, a.trace, a.seed)))


if __name__ == "__main__":
    main()
