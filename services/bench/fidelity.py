"""The fidelity study of docs/fidelity.md: per layout, profile once (its own requests), then at each load replay a
scaled conv trace with another seed, simulate the same requests with that profile, and compare.

    python -m services.bench.fidelity --out docs/results/fidelity LAYOUT=RATE,RATE ...
    python -m services.bench.fidelity --out DIR --hardware h200x1 --capacity-s 20 --fractions 0.2,0.8 LAYOUT ...

A LAYOUT without rates is run at `--fractions` of its measured capacity: before the profile (this also warms every
process up), a closed loop keeps every decode/mixed worker's batch full and counts completions over `--capacity-s`
seconds from the moment its first wave has been prefilled (services/bench/cluster.py `capacity`). The profile runs on the layout's own device (`pools[].device`)
and is written under `--hardware`, the catalog name the layout's pools carry.

Each step is the CLI verb of the same name: `tandem profile LAYOUT --out P.csv`, `tandem bench cluster LAYOUT
--trace conv --rate R --duration S --seed N --json M.json`, `tandem sim run LAYOUT --trace M.trace.csv --perf
P.csv --json S.json`, `tandem compare S.json M.json --plot F.png`. One cluster per layout serves the profile's
overhead probe and every load (started once: model loading is most of a start on this machine).
"""

from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import asdict
from pathlib import Path
from typing import Any

from rich.console import Console

from services.bench.cluster import Scaling, bench, capacity, running_cluster, scaled_workload
from services.bench.compare import HEADLINE, compare, plot_cdfs, table
from services.bench.load import write_trace


def _simulate(layout_path: Path, profile: Path, trace_csv: Path, seed: int = 0) -> dict[str, Any]:
    from services.contracts.layout import load_layout
    from sim.cluster import simulate
    from sim.results import run_samples, summarize_run
    from sim.trace import make_workload

    lay = load_layout(layout_path)
    lay = lay.model_copy(update={"sim": lay.sim.model_copy(update={"perf_model": str(profile)})})
    run = simulate(lay, make_workload(str(trace_csv)), seed=seed)  # seed: the profile's step jitter draws
    return {**summarize_run(run), "samples": run_samples(run)}


def _free_gpu_memory() -> None:
    """The profile's in-process engine is gone: give its cached GPU memory back (the workers share the GPU)."""
    import gc
    import sys

    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def study(layout: Path, rates: list[float] | None, duration: float, seed: int, out: Path, quick: bool,
          console: Console, hardware: str = "cpu", scaling: Scaling | None = None, capacity_s: float = 0.0,
          fractions: list[float] | None = None) -> list[dict[str, Any]]:
    """One layout: start its cluster, [measure its capacity,] profile through it, then replay, simulate and
    compare at each rate (given, or `fractions` of the measured capacity)."""
    from services.bench.verify_cli import _write_json, profile_to

    name = layout.stem
    scaling = scaling or Scaling()
    rows = []
    with running_cluster(layout, log_dir=out / f"{name}-logs", note=console.print) as (lay, served):
        cap = None
        if capacity_s:
            w = scaled_workload("conv", 50.0, 20.0, seed + 1000, scaling)  # ~1000 requests, sizes from the trace
            console.rule(f"{name}: capacity, closed loop for {capacity_s:g} s")
            cap = capacity(lay, w, capacity_s)
            _write_json(out / f"{name}-capacity.json", cap)
            console.print(f"{name}: {cap['completed']} completed ({cap['failed']} failed) at concurrency "
                          f"{cap['concurrency']}, window {cap['ramp_s']:.1f}-{cap['ramp_s'] + capacity_s:.1f} s: "
                          f"capacity {cap['capacity_rps']:.2f} req/s")
        if rates is None:
            if cap is None or not cap["capacity_rps"] > 0:
                raise SystemExit(f"{layout}: no rates given and no capacity measured (--capacity-s S --fractions F,F)")
            rates = [round(f * cap["capacity_rps"], 2) for f in (fractions or [0.2, 0.8])]
        prof = out / f"{name}-profile.csv"
        profile_to(prof, str(served), None, None, hardware, None, quick, True, console)
        _free_gpu_memory()
        for rate in rates:
            tag = f"{name}-r{rate:g}"
            w = scaled_workload("conv", rate, duration, seed, scaling)
            write_trace(w, out / f"{tag}.trace.csv")
            console.rule(f"{tag}: {len(w)} requests")
            measured = bench(lay, w)
            _write_json(out / f"{tag}-measured.json", {"layout": str(layout), "rate": rate, "duration": duration,
                                                       "seed": seed, "scaling": asdict(scaling), **measured})
            predicted = _simulate(layout, prof, out / f"{tag}.trace.csv", seed)
            _write_json(out / f"{tag}-predicted.json", predicted)
            cmp = compare(predicted, measured)
            _write_json(out / f"{tag}-compare.json", cmp)
            plot_cdfs(predicted, measured, out / f"{tag}-cdf.png", f"{name}, conv scaled, {rate:g} req/s")
            console.print(table(cmp, tag))
            rows.append({"layout": name, "rate": rate, "requests": len(w), **cmp,
                         "loadavg": measured["loadavg_before"],
                         **({"capacity_rps": cap["capacity_rps"]} if cap else {})})
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    head = "| layout | req/s | n | " + " | ".join(f"{k} pred / meas (err)" for k in HEADLINE) + " |"
    lines = [head, "|" + "---|" * (3 + len(HEADLINE))]
    for r in rows:
        cells = []
        for k in HEADLINE:
            e = r["relative_error"].get(k)
            cells.append(f"{r['predicted'][k]:.3f} / {r['measured'][k]:.3f} ({'-' if e is None else f'{e:+.0%}'})")
        lines.append(f"| {r['layout']} | {r['rate']:g} | {r['requests']} | " + " | ".join(cells) + " |")
    p50 = [abs(r["relative_error"][k]) for r in rows for k in ("ttft_p50_s", "tbt_p50_s", "e2e_p50_s")
           if r["relative_error"].get(k) is not None]
    p99 = [abs(r["relative_error"][k]) for r in rows for k in ("ttft_p99_s", "tbt_p99_s", "e2e_p99_s")
           if r["relative_error"].get(k) is not None]
    if p50 and p99:
        lines.append(f"\nmedian |relative error|: p50 keys {statistics.median(p50):.0%}, p99 keys "
                     f"{statistics.median(p99):.0%}")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="LAYOUT=RATE[,RATE...], or LAYOUT alone with --capacity-s and --fractions")
    ap.add_argument("--out", type=Path, default=Path("docs/results/fidelity"))
    ap.add_argument("--duration", type=float, default=60.0)
    ap.add_argument("--seed", type=int, default=1, help="the replayed trace's seed (the profile uses its own requests)")
    ap.add_argument("--quick", action="store_true", help="the quick profile plan")
    ap.add_argument("--hardware", default="cpu", help="the profile table's hardware name (the layout's pools' "
                    "`hardware`, a sim/catalog.py key)")
    ap.add_argument("--capacity-s", type=float, default=0.0, help="measure capacity first: a closed loop, every "
                    "decode/mixed worker's batch kept full, counted over this many seconds once the first wave is in")
    ap.add_argument("--fractions", default="0.2,0.8", help="rates for a LAYOUT without rates, as fractions of the "
                    "measured capacity")
    d = Scaling()
    ap.add_argument("--prompt-scale", type=float, default=d.prompt_scale)
    ap.add_argument("--output-scale", type=float, default=d.output_scale)
    ap.add_argument("--max-prompt", type=int, default=d.max_prompt)
    ap.add_argument("--max-output", type=int, default=d.max_output)
    a = ap.parse_args()
    console = Console()
    a.out.mkdir(parents=True, exist_ok=True)
    scaling = Scaling(a.prompt_scale, a.output_scale, a.max_prompt, a.max_output)
    fractions = [float(x) for x in a.fractions.split(",")]
    rows = []
    for run in a.runs:
        path, sep, rates = run.partition("=")
        given = [float(x) for x in rates.split(",")] if sep else None
        rows += study(Path(path), given, a.duration, a.seed, a.out, a.quick, console, a.hardware, scaling,
                      a.capacity_s, fractions)
        (a.out / "summary.json").write_text(json.dumps(rows, indent=1, default=float))
    md = markdown(rows)
    (a.out / "summary.md").write_text(md)
    console.print(md)


if __name__ == "__main__":
    main()
