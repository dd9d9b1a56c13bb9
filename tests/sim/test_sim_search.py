"""Design search and report: budgets respected, bisection brackets the SLO edge, JSQ balances, plots written."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from services.contracts.layout import parse_layout
from sim import catalog
from sim.cluster import simulate
from sim.search import iso_budget_designs, max_rate, meets, run_at, split_layout
from sim.trace import load_trace, synthetic

REPO = Path(__file__).resolve().parents[2]


def small_base(**sim: object) -> object:
    return parse_layout({"model": {"name": "llama2-70b"}, "batching": {"max_batch": 32},
                         "slo": {"ttft_s": 1.0, "tbt_s": 0.08},
                         "sim": {"perf_model": "profile", **sim},
                         "pools": [{"role": "mixed", "count": 2, "hardware": "dgx-h100"}]})


def test_iso_power_designs_fill_but_never_exceed_the_budget() -> None:
    base = small_base()
    budget = 408_000
    designs = list(iso_budget_designs(base, "dgx-h100", "dgx-a100", "power", budget, step=5))
    assert [d.name for d in designs[:2]] == ["baseline-dgx-h100-40", "baseline-dgx-a100-62"]
    for d in designs:
        watts = [catalog.hardware(p.hardware).power_peak_w * p.count for p in d.pools]
        assert sum(watts) <= budget
        cheapest_token = catalog.hardware(d.pools[-1].hardware).power_peak_w
        assert sum(watts) + cheapest_token > budget  # one more token machine would not fit
    capped = list(iso_budget_designs(base, "dgx-h100", "dgx-h100", "power", budget, step=25, decode_cap_w=7140))
    assert capped[-1].pools[1].count == 21 and capped[-1].pools[1].power_cap_w == 7140  # Splitwise-HHcap


def test_max_rate_brackets_the_slo_edge() -> None:
    base = small_base()
    trace = load_trace(str(REPO / "tests/data/azure_conv_200.csv"))
    lay = split_layout(base, "dgx-h100", "dgx-h100", 0, 1)
    probe = max_rate(lay, trace, duration_s=30, lo=0.5, rel_tol=0.05, criterion="attainment", target=0.95)
    assert probe is not None and probe.ok
    assert probe.result["slo_attainment"] >= 0.95
    above = run_at(lay, trace, probe.rate * 1.3, 30, 0)
    assert not meets(above, "attainment", 0.95)
    # more machines sustain more
    bigger = max_rate(split_layout(base, "dgx-h100", "dgx-h100", 0, 3), trace, duration_s=30, lo=0.5,
                      rel_tol=0.05, criterion="attainment", target=0.95)
    assert bigger is not None and bigger.rate > 2 * probe.rate


def test_jsq_balances_prompt_queues_better_than_random() -> None:
    w = synthetic(load_trace("code"), rate=30, duration_s=30, seed=0)
    ttft = {}
    for policy in ("jsq", "random"):
        lay = parse_layout({"model": {"name": "llama2-70b"}, "router": {"policy": policy},
                            "sim": {"perf_model": "profile"},
                            "pools": [{"role": "prefill", "count": 4, "hardware": "dgx-a100"},
                                      {"role": "decode", "count": 4, "hardware": "dgx-a100"}]})
        r = simulate(lay, w).reqs
        ttft[policy] = np.nanpercentile(r.first_tok - r.arrival, 99)
    assert ttft["jsq"] < ttft["random"]


@pytest.mark.slow  # matplotlib and ~40 short simulations
def test_report_writes_the_three_plots(tmp_path: Path) -> None:
    from sim.report import make_report

    a = tmp_path / "a.yaml"
    a.write_text("name: two\nmodel: {name: llama2-70b}\nsim: {perf_model: profile}\n"
                 "pools: [{role: mixed, count: 2, hardware: dgx-h100}]\n")
    table = make_report([a], trace=str(REPO / "tests/data/azure_conv_200.csv"), rate=2.0, rates=[1.0, 4.0],
                        duration_s=10, seed=0, out_dir=tmp_path / "out", json_out=tmp_path / "r.json")
    for name in ("sim_cdf.png", "sim_throughput.png", "sim_frontier.png"):
        assert (tmp_path / "out" / name).stat().st_size > 10_000
    assert "| two |" in table and (tmp_path / "r.json").is_file()


def test_search_in_parallel_gives_the_same_answer() -> None:
    from sim.search import best_under_budget, cheapest_for_load

    base = small_base()
    trace = str(REPO / "tests/data/azure_conv_200.csv")
    kw = dict(duration_s=20, seed=1, step=1)
    one = best_under_budget(base, trace, "dgx-h100", "dgx-a100", "power", 4 * 10200, **kw)
    seen: list[tuple[str, int]] = []
    two = best_under_budget(base, trace, "dgx-h100", "dgx-a100", "power", 4 * 10200, jobs=2,
                            progress=lambda name, total: seen.append((name, total)), **kw)
    assert one == two and len(one) >= 4
    assert sorted(n for n, _ in seen) == sorted(r["name"] for r in one) and {t for _, t in seen} == {len(one)}
    kw = dict(max_machines=4, duration_s=20, seed=1)
    assert cheapest_for_load(base, trace, 2.0, ["dgx-h100"], jobs=2, **kw) == \
        cheapest_for_load(base, trace, 2.0, ["dgx-h100"], **kw)


def test_search_on_a_local_ray_instance_gives_the_same_answer() -> None:
    ray = pytest.importorskip("ray", reason="ray is not installed (optional extra: pip install 'tandem[ray]')")
    from sim.search import best_under_budget

    base = small_base()
    trace = str(REPO / "tests/data/azure_conv_200.csv")
    kw = dict(duration_s=20, seed=1, step=1)
    local = best_under_budget(base, trace, "dgx-h100", "dgx-a100", "power", 3 * 10200, **kw)
    assert best_under_budget(base, trace, "dgx-h100", "dgx-a100", "power", 3 * 10200, ray_address="local",
                             **kw) == local
    assert not ray.is_initialized()
