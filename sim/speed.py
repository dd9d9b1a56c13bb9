"""The speed benchmark: simulated requests per CPU second, our multi-iteration segments vs one event per
decode iteration, on the same trace and layout in one run."""

from __future__ import annotations

import gc
import time
from pathlib import Path

from services.contracts.layout import load_layout
from sim.cluster import simulate
from sim.results import summarize_run
from sim.trace import load_trace, replay
from sim.worker import Worker

SPLITWISE_SIM_CPU_PER_REQ_S = (3e-3, 14e-3)  # the figure for splitwise-sim


def _time(layout_path: Path, trace: str, rate: float | None, limit: int | None,
          repeats: int) -> tuple[float, float, int, dict]:
    """Best CPU seconds and best wall seconds of `repeats` simulations (setup included, summary excluded)."""
    lay = load_layout(layout_path)
    wl = replay(load_trace(trace), rate=rate)
    Worker.segment_limit = limit
    try:
        cpu = wall = float("inf")
        for _ in range(repeats):
            gc.collect()  # each run starts from a clean heap (earlier runs' cyclic garbage is not charged to it)
            t0, w0 = time.process_time(), time.perf_counter()
            run = simulate(lay, wl)
            cpu, wall = min(cpu, time.process_time() - t0), min(wall, time.perf_counter() - w0)
    finally:
        Worker.segment_limit = None
    return cpu, wall, len(wl), summarize_run(run)


def speed_table(layout_path: Path, trace: str = "conv", repeats: int = 3) -> str:
    """A markdown table; times are the best of `repeats` runs (the machine is shared with other work)."""
    lines = ["| workload | mode | requests | CPU s | wall s | requests / wall s | CPU µs / request | "
             "vs splitwise-sim 3 ms | vs 14 ms | TTFT p50 | TBT p50 |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for rate, label in ((None, f"{trace}, 1 h as recorded"), (70.0, f"{trace}, 1 h time-scaled to 70 req/s")):
        base = None
        for limit, mode in ((None, "segments (ours)"), (1, "one event per iteration")):
            cpu, wall, n, res = _time(layout_path, trace, rate, limit, repeats)
            per = cpu / n
            lo, hi = SPLITWISE_SIM_CPU_PER_REQ_S
            note = "" if base is None else f" ({cpu / base:.1f}x slower)"
            base = base or cpu
            lines.append(f"| {label} | {mode}{note} | {n} | {cpu:.2f} | {wall:.2f} | {n / wall:,.0f} | {per * 1e6:.1f} | "
                         f"{lo / per:.0f}x | {hi / per:.0f}x | {res['ttft_p50_s']:.4f} | {res['tbt_p50_s']:.4f} |")
    return "\n".join(lines)


def reference_speed_table(ref: Path, python: str, design: str = "splitwise-hh", rate: float = 70.0,
                          duration_s: float = 120.0, seed: int = 0) -> str:
    """CPU per simulated request of splitwise-sim (a checkout run in its own Python) and ours, measured in this
    run on one trace file (its whole process, start-up included; ours: the simulation)."""
    from sim.reference import DESIGNS, make_trace, run_ours, run_reference

    trace = make_trace(ref, python, rate=rate, duration_s=duration_s, seed=seed)
    theirs = run_reference(ref, python, design, trace, seed)
    ours = run_ours(load_layout(Path(__file__).resolve().parents[1] / DESIGNS[design][0]), trace)
    n = len(ours.e2e)
    lines = [f"{design}, {trace.name} ({n} requests, Poisson {rate:g} req/s for {duration_s:g} s, seed {seed})", "",
             "| simulator | CPU s | CPU µs / request | ratio |", "|---|---|---|---|"]
    for label, t in (("splitwise-sim (process, start-up included)", theirs), ("tandem sim (simulation)", ours)):
        lines.append(f"| {label} | {t.cpu_s:.2f} | {t.cpu_s / n * 1e6:,.1f} | {theirs.cpu_s / t.cpu_s:.0f}x |")
    return "\n".join(lines)

