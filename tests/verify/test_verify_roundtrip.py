"""Round trip: `tandem profile`'s table drives the simulator, which reproduces the profiled latencies."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from services.bench.profile import Plan, run_profile, write_profile
from services.contracts.layout import parse_layout
from sim.cluster import perf_for, simulate
from sim.perf import load_profile
from sim.trace import synthetic

pytestmark = pytest.mark.slow  # measures a real engine and pushes KV to a worker process (~10 s)

# one context per batch size: the decode rows are then the table's a(b) exactly, whatever the machine's noise
PLAN = Plan(prompt_sizes=[16, 64], prompt_batches=[1, 2], decode_batches=[1, 4], contexts=[16],
            kv_tokens=[16, 256], repeats=2, steps=3, overhead_requests=0)


@pytest.fixture(scope="module")
def profiled(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    from services.workers.modelspec import load_model

    engine = load_model("random:tiny")
    res = run_profile(engine, "smollm2-135m", "cpu", PLAN)
    out = tmp_path_factory.mktemp("profile")
    write_profile(res, out / "p.json")  # the JSON form carries the same rows as the CSV
    write_profile(res, out / "p.csv")
    return res, out


def _row_ms(res: dict, kind: str, **match: int) -> float:
    for r in res["rows"]:
        if r["kind"] == kind and all(r[k] == v for k, v in match.items()):
            return float(r["prompt_time" if kind == "prompt" else "token_time"]) / 1e3
    raise KeyError(match)


def test_table_has_every_kind_and_reads_back(profiled: tuple[dict, Path]) -> None:
    res, out = profiled
    kinds = {r["kind"] for r in res["rows"]}
    assert kinds == {"prompt", "token", "kv", "overhead"}
    for name in ("p.csv", "p.json"):
        t = load_profile(out / name, "smollm2-135m", "cpu", tensor_parallel=1)
        assert t.prompt_tokens == [16.0, 32.0, 64.0, 128.0] and t.batch == [1.0, 4.0]
        assert t.kv_Bps and t.kv_Bps > 1e6 and t.kv_latency_s is not None  # a real gRPC push, fitted
        assert t.overheads["concurrent_phases"] == 1.0


def test_simulated_single_worker_at_low_load_reproduces_the_profile(profiled: tuple[dict, Path]) -> None:
    res, out = profiled
    lay = parse_layout({"model": {"name": "smollm2-135m"}, "pools": [{"role": "mixed", "hardware": "cpu"}],
                        "sim": {"perf_model": str(out / "p.csv"), "slowdown_ref": "cpu"}})
    prompt, output = 16, 6
    w = synthetic(None, rate=0.1, duration_s=200, seed=0, fixed=(prompt, output))
    w.arrival_s[:] = np.arange(len(w)) * 10.0  # far apart: every request runs alone
    r = simulate(lay, w).reqs
    ttft = r.first_tok - r.arrival
    tbt = (r.finish - r.first_tok) / (output - 1)
    np.testing.assert_allclose(ttft, _row_ms(res, "prompt", prompt_size=prompt, batch_size=1), rtol=0.05)
    # each step runs batch 1 at context 17..21; the profiled step at context 16 is within 5% of them
    np.testing.assert_allclose(tbt, _row_ms(res, "token", batch_size=1, token_size=16), rtol=0.05)
    perf = perf_for(lay, "cpu")
    assert perf.decode(4)[0] == pytest.approx(_row_ms(res, "token", batch_size=4, token_size=16), rel=1e-6)
    assert perf.prefill(128)[0] == pytest.approx(_row_ms(res, "prompt", prompt_size=64, batch_size=2), rel=1e-6)


def test_context_dependent_decode_is_fitted_per_batch_size(tmp_path: Path) -> None:
    """token rows at two contexts per batch size give t = a(b) + c(b)·C through both points; old tables
    (no `kind` column) keep c = 0."""
    csv = tmp_path / "t.csv"
    csv.write_text("model,hardware,kind,prompt_size,batch_size,token_size,prompt_time,token_time\n"
                   "smollm2-135m,cpu,prompt,16,1,,20,\nsmollm2-135m,cpu,prompt,64,1,,60,\n"
                   "smollm2-135m,cpu,token,,1,100,,10\nsmollm2-135m,cpu,token,,1,300,,12\n"
                   "smollm2-135m,cpu,token,,4,100,,20\nsmollm2-135m,cpu,token,,4,300,,30\n")
    lay = parse_layout({"model": {"name": "smollm2-135m"}, "pools": [{"role": "mixed", "hardware": "cpu"}],
                        "sim": {"perf_model": str(csv)}})
    perf = perf_for(lay, "cpu")
    for b, ctx, ms in ((1, 100, 10), (1, 300, 12), (4, 100, 20), (4, 300, 30)):
        a, c, _ = perf.decode(b)
        assert a + c * b * ctx == pytest.approx(ms / 1e3, rel=1e-9)
    assert not perf.concurrent_phases and perf.request_overhead_s == 0.0  # no overhead rows: the defaults
