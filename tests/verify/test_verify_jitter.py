"""The decode step's measured spread (`tandem profile`'s step_jitter_q rows) drives the simulator's per-iteration
durations; a profile without those rows simulates exactly as before."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from services.bench.profile import jitter_quantiles
from services.contracts.errors import InvalidArgument
from services.contracts.layout import parse_layout
from sim.cluster import perf_for, simulate
from sim.perf import step_jitter
from sim.trace import synthetic

STEP_S = 0.010  # the table's decode step at batch 1 (one context: no context term)
# multiplier inverse CDF: level (per mille) -> multiplier; a heavy upper tail like the cluster's token gaps
QUANTILES = {0: 0.6, 250: 0.9, 500: 1.0, 750: 1.2, 900: 1.8, 990: 4.0, 1000: 6.0}


def _table(tmp_path: Path, jitter: dict[int, float] | None) -> Path:
    rows = ["model,hardware,kind,prompt_size,batch_size,token_size,prompt_time,token_time,name,value",
            "smollm2-135m,cpu,prompt,16,1,,20,,,", "smollm2-135m,cpu,prompt,64,1,,60,,,",
            f"smollm2-135m,cpu,token,,1,16,,{STEP_S * 1e3},,", "smollm2-135m,cpu,token,,4,16,,20,,"]
    rows += [f"smollm2-135m,cpu,overhead,,,,,,step_jitter_q{lv:04d},{v}" for lv, v in (jitter or {}).items()]
    path = tmp_path / ("jitter.csv" if jitter else "plain.csv")
    path.write_text("\n".join(rows) + "\n")
    return path


def _run(table: Path, seed: int = 0, n: int = 12, output: int = 201):
    lay = parse_layout({"model": {"name": "smollm2-135m"}, "pools": [{"role": "mixed", "hardware": "cpu"}],
                        "sim": {"perf_model": str(table)}})
    w = synthetic(None, rate=0.1, duration_s=10 * n, seed=0, fixed=(16, output))
    w.arrival_s[:] = np.arange(len(w)) * 100.0  # far apart: every request decodes alone, at batch 1
    return simulate(lay, w, seed=seed)


def _gaps(run) -> np.ndarray:
    vals, weights = np.asarray(run.tally.gap_values), np.asarray(run.tally.gap_weights)
    assert set(weights) == {1.0}  # one request at a time: every sample is one gap
    return vals


def test_simulated_gaps_follow_the_profiled_distribution(tmp_path: Path) -> None:
    run = _run(_table(tmp_path, QUANTILES))
    gaps = _gaps(run)
    n = len(run.reqs.finish)
    assert n >= 8 and len(gaps) == n * 199  # every gap after the first decode step is its own sample
    levels = np.array(sorted(QUANTILES)) / 1000
    mult = np.array([QUANTILES[k] for k in sorted(QUANTILES)])
    for q in (0.1, 0.25, 0.5, 0.75, 0.9):  # ~2,400 draws: a quantile's sampling error is ~1-2% here
        assert np.quantile(gaps, q) == pytest.approx(STEP_S * np.interp(q, levels, mult), rel=0.06)
    assert gaps.min() >= STEP_S * 0.6 - 1e-12 and gaps.max() <= STEP_S * 6.0 + 1e-12
    # the mean multiplier is the area under the inverse CDF; the request's E2E carries it
    mean = float(np.trapezoid(mult, levels)) if hasattr(np, "trapezoid") else float(np.trapz(mult, levels))
    assert gaps.mean() == pytest.approx(STEP_S * mean, rel=0.05)
    r = run.reqs
    decode = r.finish - r.first_tok
    assert decode.mean() == pytest.approx(200 * STEP_S * mean, rel=0.05)


def test_same_seed_same_run_other_seed_other_draws(tmp_path: Path) -> None:
    table = _table(tmp_path, QUANTILES)
    a, b, c = _run(table, seed=3, n=4), _run(table, seed=3, n=4), _run(table, seed=4, n=4)
    np.testing.assert_array_equal(_gaps(a), _gaps(b))
    np.testing.assert_array_equal(a.reqs.finish, b.reqs.finish)
    assert not np.array_equal(_gaps(a), _gaps(c))


def test_without_jitter_rows_every_step_is_the_profiled_one(tmp_path: Path) -> None:
    table = _table(tmp_path, None)
    run = _run(table, n=4)
    lay = parse_layout({"model": {"name": "smollm2-135m"}, "pools": [{"role": "mixed", "hardware": "cpu"}],
                        "sim": {"perf_model": str(table)}})
    assert perf_for(lay, "cpu").jitter is None
    # a lone request's decode is one segment: one gap sample weighted by its 199 gaps, each exactly the step
    assert run.tally.gaps == [(pytest.approx(STEP_S, rel=1e-12), 199)] * len(run.reqs.finish)
    np.testing.assert_allclose(run.reqs.finish - run.reqs.first_tok, 200 * STEP_S, rtol=1e-12)
    # and the seed plays no part
    np.testing.assert_array_equal(_run(table, seed=9, n=4).reqs.finish, run.reqs.finish)


def test_profile_quantiles_from_gaps_read_back() -> None:
    rng = np.random.default_rng(1)
    lists = [list(0.05 * rng.lognormal(0.0, 0.4, 40)) for _ in range(5)]
    q = jitter_quantiles(lists)
    levels, values = step_jitter(q)  # the simulator reads exactly what the profile writes
    assert levels[0] == 0.0 and levels[-1] == 1.0 and np.all(np.diff(values) >= 0)
    assert q["step_jitter_q0500"] == pytest.approx(1.0, abs=0.05)  # each request over its own median
    assert jitter_quantiles([[0.1, 0.2, 0.3]]) == {}  # too few gaps: no rows, no jitter


@pytest.mark.parametrize("bad", [{0: 0.5, 500: 1.0}, {0: 1.0, 500: 0.5, 1000: 2.0}, {0: -0.1, 1000: 1.0}])
def test_malformed_jitter_rows_are_refused(bad: dict[int, float]) -> None:
    with pytest.raises(InvalidArgument, match="step_jitter_q"):
        step_jitter({f"step_jitter_q{k:04d}": v for k, v in bad.items()})
