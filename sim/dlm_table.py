"""The docs/sim.md dlm-pool table: `tandem sim dlm-table [LAYOUT] [--rate R]` simulates the layout's dlm pool
for two sampler variants and one or two machines and prints a markdown table."""

from __future__ import annotations

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

