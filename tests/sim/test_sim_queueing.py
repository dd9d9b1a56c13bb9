"""Simulator sanity: M/D/1 closed form, exact service times, conservation, segment math vs per-iteration."""

from __future__ import annotations

import numpy as np
import pytest

from services.contracts.layout import parse_layout
from sim.cluster import perf_for, simulate
from sim.results import summarize_run
from sim.trace import load_trace, synthetic
from sim.worker import Worker, iters_done, seg_time


def one_worker(policy: str = "sequential", **extra: object) -> object:
    return parse_layout({"model": {"name": "llama3-8b"},
                         "pools": [{"role": "mixed", "count": 1, "hardware": "dgx-h100"}],
                         "batching": {"policy": policy, "max_batch": 1 if policy == "sequential" else 32,
                                      "max_batch_tokens": 512},
                         "sim": {"perf_model": "roofline", "drain_s": 1e6}, **extra})


def service_time(layout: object, prompt: int, output: int) -> float:
    perf = perf_for(layout, "dgx-h100")
    a, c, _ = perf.decode(1)
    return perf.prefill(prompt)[0] + sum(a + c * (prompt + 1 + i) for i in range(output - 1))


def test_isolated_request_takes_exactly_the_model_service_time() -> None:
    lay = one_worker()
    w = synthetic(None, rate=0.01, duration_s=3000, seed=1, fixed=(300, 40))  # far apart: no queueing
    r = simulate(lay, w).reqs
    s = service_time(lay, 300, 40)
    assert np.allclose(r.finish - r.arrival, s, rtol=1e-9)
    assert np.allclose(r.first_tok - r.arrival, perf_for(lay, "dgx-h100").prefill(300)[0], rtol=1e-9)


@pytest.mark.parametrize("output", [1, 20])
def test_md1_wait_follows_lindley_and_the_closed_form(output: int) -> None:
    """Poisson arrivals, deterministic service S on one FIFO server.

    Per request, the wait must follow Lindley's recursion W' = max(0, W + S - A) exactly; on average it must
    match the M/D/1 closed form Wq = rho·S / (2(1-rho)) within a few percent (sampling noise at 100k requests).
    """
    lay = one_worker()
    s = service_time(lay, 400, output)
    rho = 0.6
    rate = rho / s
    n = 100_000 if output == 1 else 20_000
    w = synthetic(None, rate=rate, duration_s=n / rate, seed=3, fixed=(400, output))
    r = simulate(lay, w).reqs
    wait = (r.finish - r.arrival) - s
    gaps = np.diff(r.arrival)
    lindley = np.zeros(len(wait))
    for i, g in enumerate(gaps, start=1):
        lindley[i] = max(0.0, lindley[i - 1] + s - g)
    np.testing.assert_allclose(wait, lindley, atol=1e-9 * s * len(wait) ** 0.5)
    expect = rho * s / (2 * (1 - rho))
    assert wait.mean() == pytest.approx(expect, rel=0.04 if output == 1 else 0.08)


def test_conservation_with_drops_and_unfinished() -> None:
    lay = parse_layout({"model": {"name": "bloom-176b"},
                        "pools": [{"role": "prefill", "count": 2, "hardware": "dgx-h100"},
                                  {"role": "decode", "count": 2, "hardware": "dgx-h100",
                                   "batching": {"kv_budget_mb": 12000}}],
                        "sim": {"perf_model": "profile", "drain_s": 5.0}})
    w = synthetic(load_trace("conv"), rate=20, duration_s=20, seed=0)
    run = simulate(lay, w)
    res = summarize_run(run)
    r = run.reqs
    done = ~np.isnan(r.finish)
    assert res["rejected"] > 0  # prompt + output over 12 GB of KV: refused at the router
    assert res["unfinished"] > 0  # the 5 s drain cuts the backlog
    assert res["entered"] == len(w) == res["completed"] + res["dropped"]
    assert res["dropped"] == res["rejected"] + res["unfinished"]
    assert np.array_equal(r.gen[done], r.output[done])  # every completed request got exactly its tokens
    assert np.all(r.gen[~done] < r.output[~done])
    assert res["output_tokens_completed"] == int(r.output[done].sum())
    assert np.all(r.gen[r.rejected] == 0)


def test_segments_equal_one_event_per_iteration() -> None:
    """The closed-form multi-iteration segment reproduces the per-iteration simulation exactly."""
    lay = parse_layout({"model": {"name": "llama2-70b"},
                        "pools": [{"role": "prefill", "count": 1, "hardware": "dgx-a100"},
                                  {"role": "decode", "count": 2, "hardware": "dgx-a100"}],
                        "batching": {"max_batch": 16}, "sim": {"perf_model": "roofline"}})
    w = synthetic(load_trace("conv"), rate=3, duration_s=40, seed=2)
    fast = simulate(lay, w)
    Worker.segment_limit = 1
    try:
        slow = simulate(lay, w)
    finally:
        Worker.segment_limit = None
    assert fast.tally.events < slow.tally.events / 5
    np.testing.assert_allclose(fast.reqs.finish, slow.reqs.finish, rtol=1e-9)
    np.testing.assert_allclose(fast.reqs.first_gap, slow.reqs.first_gap, rtol=1e-9)
    a, b = summarize_run(fast), summarize_run(slow)
    for k in ("tbt_p50_s", "tbt_p99_s", "tbt_mean_p50_s", "e2e_p99_s", "energy_j"):
        assert a[k] == pytest.approx(b[k], rel=1e-3), k


def test_iters_done_inverts_segment_time() -> None:
    rng = np.random.default_rng(0)
    for _ in range(200):
        a, c, c0, b = rng.uniform(0.01, 0.05), rng.uniform(0, 1e-6), rng.integers(0, 50000), int(rng.integers(1, 64))
        k = int(rng.integers(1, 400))
        t = seg_time(k, a, c, c0, b)
        assert iters_done(t, a, c, c0, b) == k
        assert iters_done(t * (1 - 1e-6), a, c, c0, b) == k - 1


def test_static_batching_waits_for_the_longest_member() -> None:
    lay = one_worker("static")
    w = synthetic(None, rate=50, duration_s=0.2, seed=0, fixed=(100, 5))
    w.output[:] = np.arange(len(w)) % 3 * 10 + 2  # 2, 12, 22, ...
    w.arrival_s[:] = 0.0  # all at once: one prefill batch each of max_batch_tokens, then one static batch
    run = simulate(lay, w)
    fused = simulate(one_worker("fusion"), w)
    assert np.nanmean(run.reqs.finish) >= np.nanmean(fused.reqs.finish)
    assert np.array_equal(run.reqs.gen, w.output)
