"""Design-space search: the highest load a layout sustains within SLO, the cheapest layout for a load, and the
best throughput under an iso-power or iso-cost budget (Splitwise's design-space study)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from services.contracts.errors import InvalidArgument
from services.contracts.layout import Layout
from sim import catalog
from sim.cluster import simulate
from sim.parallel import fan_out
from sim.results import summarize_run
from sim.trace import Workload, load_trace, synthetic


@dataclass(slots=True)
class Probe:
    """One (layout, rate) simulation and whether it met the SLO."""

    rate: float
    ok: bool
    result: dict


def meets(res: dict, criterion: str, target: float) -> bool:
    """'slowdown': Splitwise's p50/p90/p99 slowdown SLOs; 'attainment': the layout's SLO met by >= target."""
    if criterion == "slowdown":
        return bool(res["slowdown_slo_met"])
    return res["slo_attainment"] >= target


def run_at(layout: Layout, base: Workload, rate: float, duration_s: float, seed: int) -> dict:
    w = synthetic(base, rate=rate, duration_s=duration_s, seed=seed)
    return summarize_run(simulate(layout, w))


def max_rate(layout: Layout, base: Workload, *, duration_s: float = 120.0, seed: int = 0, lo: float = 1.0,
             hi: float | None = None, rel_tol: float = 0.03, criterion: str = "slowdown",
             target: float = 0.99) -> Probe | None:
    """Bisection on the Poisson rate for the highest rate that meets the SLO (None if even `lo` fails)."""
    first = run_at(layout, base, lo, duration_s, seed)
    if not meets(first, criterion, target):
        return None
    best = Probe(lo, True, first)
    if hi is None:  # grow until it fails
        hi = lo * 2
        while True:
            res = run_at(layout, base, hi, duration_s, seed)
            if not meets(res, criterion, target):
                break
            best = Probe(hi, True, res)
            hi *= 2
            if hi > 1e5:
                return best
    lo = best.rate
    while hi - lo > rel_tol * lo:
        mid = (lo + hi) / 2
        res = run_at(layout, base, mid, duration_s, seed)
        if meets(res, criterion, target):
            best, lo = Probe(mid, True, res), mid
        else:
            hi = mid
    return best


def split_layout(base: Layout, prefill_hw: str, decode_hw: str, n_prefill: int, n_decode: int,
                 decode_cap_w: float | None = None) -> Layout:
    """A phase-split layout (n_prefill prefill + n_decode decode workers), or colocated when n_prefill is 0."""
    data = base.model_dump()
    if n_prefill == 0:
        data["pools"] = [{"role": "mixed", "count": n_decode, "hardware": decode_hw, "power_cap_w": decode_cap_w}]
        data["name"] = f"baseline-{decode_hw}-{n_decode}"
    else:
        data["pools"] = [{"role": "prefill", "count": n_prefill, "hardware": prefill_hw},
                         {"role": "decode", "count": n_decode, "hardware": decode_hw, "power_cap_w": decode_cap_w}]
        data["name"] = f"split-{prefill_hw}x{n_prefill}-{decode_hw}x{n_decode}"
    return Layout.model_validate(data)


def worker_budget(hw_name: str, kind: str, cap_w: float | None = None) -> float:
    hw = catalog.hardware(hw_name)
    if kind == "power":
        return min(cap_w, hw.power_peak_w) if cap_w else hw.power_peak_w
    if kind == "cost":
        return hw.cost_per_hour
    raise InvalidArgument(f"budget: kind must be 'power' or 'cost', got {kind!r}", param="budget")


def iso_budget_designs(base: Layout, prefill_hw: str, decode_hw: str, kind: str, budget: float, *,
                       step: int = 1, decode_cap_w: float | None = None) -> Iterator[Layout]:
    """Every split (prefill count p, the most decode workers the remaining budget buys), plus the colocated
    design of each hardware type that fills the budget."""
    bp, bt = worker_budget(prefill_hw, kind), worker_budget(decode_hw, kind, decode_cap_w)
    for hw in dict.fromkeys((prefill_hw, decode_hw)):
        n = int(budget // worker_budget(hw, kind))
        if n > 0:
            yield split_layout(base, hw, hw, 0, n)
    p = step
    while p * bp < budget:
        d = int((budget - p * bp + 1e-6) // bt)
        if d >= 1:
            yield split_layout(base, prefill_hw, decode_hw, p, d, decode_cap_w)
        p += step


def best_under_budget(base: Layout, trace: str, prefill_hw: str, decode_hw: str, kind: str, budget: float, *,
                      duration_s: float = 60.0, seed: int = 0, step: int = 1, decode_cap_w: float | None = None,
                      progress: Callable[[str, int], None] | None = None, jobs: int = 1,
                      ray_address: str | None = None) -> list[dict]:
    """Max throughput within SLO of every design in the budget, best first (designs probed in parallel with
    jobs > 1 or on Ray; the same answer either way)."""
    wl = load_trace(trace)
    designs = list(iso_budget_designs(base, prefill_hw, decode_hw, kind, budget, step=step,
                                      decode_cap_w=decode_cap_w))
    tick = (lambda i: progress(designs[i].name, len(designs))) if progress else None
    rows = fan_out(_design_row, [(lay, wl, duration_s, seed) for lay in designs], jobs=jobs,
                   ray_address=ray_address, progress=tick)
    return sorted(rows, key=lambda r: -r["max_rate_rps"])


def _design_row(lay: Layout, wl: Workload, duration_s: float, seed: int) -> dict:
    return _row(lay, max_rate(lay, wl, duration_s=duration_s, seed=seed))


def cheapest_for_load(base: Layout, trace: str, rate: float, hardware: list[str], *, max_machines: int = 80,
                      duration_s: float = 60.0, seed: int = 0, criterion: str = "slowdown", target: float = 0.99,
                      progress: Callable[[str, int], None] | None = None, jobs: int = 1,
                      ray_address: str | None = None) -> list[dict]:
    """For each hardware pairing and prefill count, the fewest decode workers that meet the SLO at `rate`;
    returns every feasible design, cheapest first. Each pairing's search is one job."""
    wl = load_trace(trace)
    units: list[tuple[str, str, int, str]] = [(hw, hw, 0, f"baseline {hw}") for hw in hardware]
    for php in hardware:
        for thw in hardware:
            units += [(php, thw, p, f"split {php}->{thw} x{p}") for p in (1, 2, 4, 8, 12, 16, 24, 32)
                      if p < max_machines]
    calls = [(base, wl, rate, php, thw, p, max_machines, duration_s, seed, criterion, target)
             for php, thw, p, _ in units]
    tick = (lambda i: progress(units[i][3], len(units))) if progress else None
    found = fan_out(_fewest, calls, jobs=jobs, ray_address=ray_address, progress=tick)
    rows = [_row(lay, Probe(rate, True, res)) for lay, res in filter(None, found)]
    return sorted(rows, key=lambda r: r["cost_per_hour"])


def _fewest(base: Layout, wl: Workload, rate: float, prefill_hw: str, decode_hw: str, n_prefill: int,
            max_machines: int, duration_s: float, seed: int, criterion: str,
            target: float) -> tuple[Layout, dict] | None:
    """The fewest decode (or, colocated, mixed) workers beside n_prefill prefill workers meeting the SLO."""
    def make(n: int) -> Layout:
        return split_layout(base, prefill_hw, decode_hw, n_prefill, n)

    def ok(lay: Layout) -> tuple[bool, dict]:
        res = run_at(lay, wl, rate, duration_s, seed)
        return meets(res, criterion, target), res

    lo, hi = 1, max_machines
    passed, res = ok(make(hi))
    if not passed:
        return None
    good = (make(hi), res)
    while lo < hi:
        mid = (lo + hi) // 2
        passed, res = ok(make(mid))
        if passed:
            hi, good = mid, (make(mid), res)
        else:
            lo = mid + 1
    return good


def _row(lay: Layout, probe: Probe | None) -> dict:
    machines = [(p.role, p.count, p.hardware, p.power_cap_w) for p in lay.pools]
    cost = sum(catalog.hardware(hw).cost_per_hour * n for _, n, hw, _ in machines)
    power = sum(min(cap or catalog.hardware(hw).power_peak_w, catalog.hardware(hw).power_peak_w) * n
                for _, n, hw, cap in machines)
    row = {"name": lay.name, "pools": [list(m) for m in machines], "cost_per_hour": cost,
           "power_provisioned_w": power, "max_rate_rps": probe.rate if probe else 0.0}
    if probe:
        for k in ("throughput_rps", "tokens_per_s", "ttft_p99_s", "tbt_p99_s", "e2e_p99_s", "power_mean_w",
                  "energy_per_token_j", "cost_per_million_tokens"):
            row[k] = probe.result[k]
    return row
