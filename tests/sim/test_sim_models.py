"""Simulator parts: catalogs, perf and power model, traces, errors at the edge, the CLI contract."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from services.contracts.errors import InvalidArgument
from services.contracts.layout import load_layout, parse_layout
from sim import catalog
from sim.cluster import perf_for, simulate
from sim.perf import PerfModel, load_profile
from sim.results import summarize_run
from sim.trace import load_trace, make_workload, replay, synthetic

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "tests" / "data"
CHECK_KEYS = ("ttft_p50_s ttft_p99_s tbt_p50_s tbt_p99_s e2e_p50_s e2e_p99_s throughput_rps tokens_per_s "
              "slo_attainment cost_per_hour power_mean_w energy_per_token_j completed dropped tbt_mean_s").split()


def test_kv_bytes_follow_the_architecture() -> None:
    # 2 (K and V) x layers x kv_heads x head_dim x 2 bytes
    assert catalog.MODELS["llama2-70b"].kv_bytes_per_token == 2 * 80 * 8 * 128 * 2
    assert catalog.MODELS["bloom-176b"].kv_bytes_per_token == 2 * 70 * 112 * 128 * 2
    assert catalog.MODELS["llama3-8b"].kv_bytes_per_token == 2 * 32 * 8 * 128 * 2
    assert catalog.MODELS["smollm2-135m"].kv_bytes_per_token == 2 * 30 * 3 * 64 * 2
    for hw in catalog.HARDWARE.values():
        assert hw.sources and hw.power_idle_w < hw.power_peak_w


def test_roofline_shape() -> None:
    perf = PerfModel(catalog.HARDWARE["dgx-h100"], catalog.MODELS["llama2-70b"])
    # prefill is compute-bound: past the knee, doubling tokens roughly doubles time
    t1, t2 = perf.prefill(4096)[0], perf.prefill(8192)[0]
    assert 1.8 < t2 / t1 < 2.3
    # decode is memory-bound: batch 1 -> 16 costs far less than 16x
    a1, c1, _ = perf.decode(1)
    a16, c16, _ = perf.decode(16)
    assert a16 < 2 * a1 and c1 == c16 > 0
    # H200 has more bandwidth: faster decode, and more KV room
    h200 = PerfModel(catalog.HARDWARE["h200"], catalog.MODELS["llama2-70b"])
    assert h200.decode(8)[0] < perf.decode(8)[0]
    assert h200.kv_capacity_tokens() > perf.kv_capacity_tokens()


def test_profile_table_interpolates_the_measurements() -> None:
    table = load_profile(REPO / "sim/data/splitwise_perf_model.csv", "bloom-176b", "h100-80gb")
    perf = PerfModel(catalog.HARDWARE["dgx-h100"], catalog.MODELS["bloom-176b"], profile=table)
    # at the measured points: the mean of the CSV runs (prompt 2048 x batch 1: 251 ms; batch 64: 63.8 ms/token)
    assert perf.prefill(2048)[0] == pytest.approx(0.2512, rel=0.01)
    assert perf.decode(64)[0] == pytest.approx(0.0638, rel=0.01)
    # between points: between the neighbours
    assert perf.decode(1)[0] < perf.decode(48)[0] < perf.decode(64)[0]
    with pytest.raises(InvalidArgument, match="no rows for model"):
        load_profile(REPO / "sim/data/splitwise_perf_model.csv", "llama3-8b", "h100-80gb")


def test_power_cap_slows_prefill_not_decode() -> None:
    hw, spec = catalog.HARDWARE["dgx-h100"], catalog.MODELS["bloom-176b"]
    free, capped = PerfModel(hw, spec), PerfModel(hw, spec, power_cap_w=0.7 * hw.power_peak_w)
    tf, wf = free.prefill(2048)
    tc, wc = capped.prefill(2048)
    assert wc <= 0.7 * hw.power_peak_w < wf
    assert 1.15 < tc / tf < 1.5  # splitwise_perf_model.csv's capped H100 prompts: ~1.3x
    assert capped.decode(8)[0] == pytest.approx(free.decode(8)[0])  # memory-bound: under the cap
    assert capped.decode(32)[0] < 1.05 * free.decode(32)[0]
    with pytest.raises(InvalidArgument, match="power_cap_w"):
        PerfModel(hw, spec, power_cap_w=100.0)


def test_trace_loading_scaling_and_synthetic() -> None:
    conv = load_trace("conv")
    assert len(conv) == 19366 and conv.arrival_s[0] == 0.0 and np.all(np.diff(conv.arrival_s) >= 0)
    small = load_trace(str(DATA / "azure_conv_200.csv"))
    assert len(small) == 200 and np.array_equal(small.prompt, conv.prompt[:200])
    scaled = replay(conv, rate=20.0)
    assert len(scaled) / scaled.arrival_s[-1] == pytest.approx(20.0, rel=1e-6)
    assert replay(conv, duration_s=60).arrival_s.max() <= 60
    pois = synthetic(conv, rate=50, duration_s=200, seed=1)
    assert abs(len(pois) - 10000) < 5 * 100  # 5 sigma
    assert set(np.unique(pois.output)) <= set(np.unique(conv.output))
    gam = synthetic(conv, rate=50, duration_s=400, seed=1, arrival="gamma", cv=3.0)
    gaps = np.diff(gam.arrival_s)
    assert gaps.std() / gaps.mean() == pytest.approx(3.0, rel=0.15)
    assert len(make_workload("fixed:100:5", rate=2, duration_s=10)) > 0
    logn = make_workload("lognormal:512:128:0.5", rate=100, duration_s=100, seed=0)
    assert np.median(logn.prompt) == pytest.approx(512, rel=0.05)
    assert np.median(logn.output) == pytest.approx(128, rel=0.05)
    assert np.std(np.log(logn.prompt)) == pytest.approx(0.5, rel=0.05)
    with pytest.raises(InvalidArgument, match="lognormal:MEDIAN_PROMPT"):
        make_workload("lognormal:512", rate=1, duration_s=10)


@pytest.mark.parametrize(("row", "message"), [
    ("2023-11-16 18:15:52.0,-5,10", "row 17: ContextTokens must be ≥ 0, got -5"),
    ("2023-11-16 18:15:52.0,12,0", "row 17: GeneratedTokens must be ≥ 1, got 0"),
    ("2023-11-16 18:15:52.0,twelve,3", "row 17: ContextTokens must be an integer"),
    ("yesterday,12,3", "row 17: TIMESTAMP 'yesterday'"),
    ("2023-11-16 18:15:52.0,12", "row 17: expected 3 fields"),
])
def test_bad_trace_rows_are_named(tmp_path: Path, row: str, message: str) -> None:
    lines = (DATA / "azure_conv_200.csv").read_text().splitlines()
    lines[17] = row  # data row 17 (line 18 of the file, after the header)
    bad = tmp_path / "bad.csv"
    bad.write_text("\n".join(lines[:30]) + "\n")
    with pytest.raises(InvalidArgument, match=message.replace("(", r"\(")):
        load_trace(str(bad))


def test_bad_trace_header_and_names(tmp_path: Path) -> None:
    bad = tmp_path / "h.csv"
    bad.write_text("TIMESTAMP,Prompt,GeneratedTokens\n0,1,1\n")
    with pytest.raises(InvalidArgument, match="ContextTokens"):
        load_trace(str(bad))
    with pytest.raises(InvalidArgument, match="'conv', 'code' or an existing CSV"):
        load_trace("chat")
    with pytest.raises(InvalidArgument, match="rate: must be > 0"):
        make_workload("conv", rate=-1, duration_s=10)
    with pytest.raises(InvalidArgument, match="duration: no request arrives"):
        make_workload("conv", rate=0.001, duration_s=1)
    with pytest.raises(InvalidArgument, match="fixed:PROMPT:OUTPUT"):
        make_workload("fixed:10", rate=1, duration_s=1)


def test_bad_layouts_name_the_field() -> None:
    w = synthetic(None, rate=1, duration_s=2, fixed=(10, 2))
    with pytest.raises(InvalidArgument, match=r"pools\.1\.hardware: unknown hardware 'tpu-v9'"):
        simulate(parse_layout({"pools": [{"role": "prefill"}, {"role": "decode", "hardware": "tpu-v9"}]}), w)
    with pytest.raises(InvalidArgument, match=r"model\.name: unknown model 'gpt-5'"):
        simulate(parse_layout({"model": {"name": "gpt-5"}}), w)
    with pytest.raises(InvalidArgument, match="pools.0.hardware: cpu cannot hold bloom-176b"):
        simulate(parse_layout({"model": {"name": "bloom-176b"}, "pools": [{"role": "mixed", "hardware": "cpu"}]}), w)
    with pytest.raises(InvalidArgument, match="sim.perf_model: the profile table has no llama3-8b"):
        simulate(parse_layout({"model": {"name": "llama3-8b"}, "pools": [{"role": "mixed", "hardware": "dgx-h100"}],
                               "sim": {"perf_model": "profile"}}), w)
    with pytest.raises(InvalidArgument, match="pools: the simulator needs at least one prefill"):
        simulate(parse_layout({"pools": [{"role": "dlm"}]}), w)
    with pytest.raises(InvalidArgument, match=r"pools\.0\.batching\.max_batch"):
        parse_layout({"pools": [{"role": "mixed", "batching": {"max_batch": 0}}]})


def test_layer_wise_transfer_hides_under_prefill_on_a_fast_link() -> None:
    def first_gap(gbps: float) -> float:
        lay = parse_layout({"model": {"name": "bloom-176b"}, "kv_link": {"bandwidth_gbps": gbps},
                            "pools": [{"role": "prefill", "hardware": "dgx-h100"},
                                      {"role": "decode", "hardware": "dgx-h100"}], "sim": {"perf_model": "profile"}})
        r = simulate(lay, synthetic(None, rate=0.1, duration_s=100, seed=0, fixed=(2000, 3))).reqs
        return float(np.nanmedian(r.first_gap))

    fast, slow = first_gap(3200), first_gap(10)
    token = perf_for(parse_layout({"model": {"name": "bloom-176b"}, "sim": {"perf_model": "profile"}}),
                     "dgx-h100").decode(1)[0]
    assert fast - token < 0.01  # Splitwise: 5-8 ms unhidden
    transfer = 2000 * catalog.MODELS["bloom-176b"].kv_bytes_per_token / (10e9 / 8)
    assert slow - token > 0.5 * transfer


def test_mixed_fallback_uses_token_machines_when_prompts_back_up() -> None:
    base = {"model": {"name": "llama2-70b"}, "sim": {"perf_model": "profile", "fallback_queue_tokens": 4096},
            "pools": [{"role": "prefill", "count": 1, "hardware": "dgx-a100"},
                      {"role": "decode", "count": 4, "hardware": "dgx-a100"}]}
    w = synthetic(load_trace("code"), rate=12, duration_s=30, seed=0)
    on = simulate(parse_layout({**base, "router": {"mixed_fallback": True}}), w).reqs
    off = simulate(parse_layout(base), w).reqs  # the default, as the runtime routes
    assert np.sum(on.prefill_on == on.dest) > 0 and np.sum(off.prefill_on == off.dest) == 0
    assert np.nanpercentile(on.first_tok - on.arrival, 90) < np.nanpercentile(off.first_tok - off.arrival, 90)


def test_phase_split_beats_colocated_at_equal_power() -> None:
    """Splitwise-AA (45 prompt + 25 token DGX-A100) vs 70 colocated DGX-A100 on conversation sizes: at a load
    the baseline can no longer hold the TBT SLO, the split design still does."""
    w = synthetic(load_trace("conv"), rate=48, duration_s=40, seed=0)
    base = summarize_run(simulate(load_layout(REPO / "examples/sim/baseline-a100.yaml"), w))
    split = summarize_run(simulate(load_layout(REPO / "examples/sim/splitwise-aa.yaml"), w))
    assert base["power_provisioned_w"] == split["power_provisioned_w"]
    assert split["slowdown_tbt_p90"] < base["slowdown_tbt_p90"]
    assert split["slowdown_slo_met"] and not base["slowdown_slo_met"]


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "services.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.slow  # two `tandem` processes: the CLI imports every area
def test_check_command_writes_the_contract_keys(tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    p = _cli("sim", "run", str(REPO / "examples/sim/splitwise-hh.yaml"), "--trace", "conv", "--rate", "70",
             "--duration", "20", "--seed", "0", "--out", str(out), cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    res = json.loads(out.read_text())
    for k in CHECK_KEYS:
        assert isinstance(res[k], int | float), k
    assert res["completed"] + res["dropped"] == res["entered"] > 1000
    bad = _cli("sim", "run", str(REPO / "examples/sim/splitwise-hh.yaml"), "--trace", "nope", cwd=tmp_path)
    assert bad.returncode == 2 and "error: trace:" in bad.stderr and "Traceback" not in bad.stderr


def test_sim_never_imports_torch_or_services() -> None:
    code = ("import sys, sim.cli, sim.cluster, sim.search, sim.results, sim.trace, sim.report, sim.speed;"
            "bad = [m for m in sys.modules if m == 'torch' or (m.startswith('services.') and not "
            "(m == 'services.contracts' or m.startswith('services.contracts.')))];"
            "assert not bad, bad")
    p = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    assert p.returncode == 0, p.stderr


def test_a_measured_profile_of_our_engine_drives_the_sim(tmp_path: Path) -> None:
    """A profile table in the same columns (as `tandem profile` may write) for SmolLM2 on this CPU."""
    csv = tmp_path / "cpu_profile.csv"
    csv.write_text("model,hardware,prompt_size,batch_size,token_size,prompt_time,token_time\n"
                   "smollm2-135m,cpu,16,1,8,20,10\nsmollm2-135m,cpu,64,1,8,60,10\n"
                   "smollm2-135m,cpu,256,1,8,200,11\nsmollm2-135m,cpu,64,4,8,210,16\n")
    lay = parse_layout({"model": {"name": "smollm2-135m"}, "pools": [{"role": "mixed", "hardware": "cpu"}],
                        "sim": {"perf_model": str(csv)}})
    w = synthetic(None, rate=0.05, duration_s=400, seed=0, fixed=(40, 3))
    w.arrival_s[:] = np.arange(len(w)) * 5.0  # spaced out: no queueing
    r = simulate(lay, w).reqs
    np.testing.assert_allclose(r.first_tok - r.arrival, 0.040, rtol=1e-9)  # halfway between 16 and 64 tokens
    # two batch-1 iterations; the token time of batch 1 is the mean over its rows (10, 10, 11 ms)
    np.testing.assert_allclose(r.finish - r.first_tok, 2 * 0.031 / 3, rtol=1e-9)
    bad = tmp_path / "bad_profile.csv"
    bad.write_text("model,hardware,prompt_size\nsmollm2-135m,cpu,16\n")
    with pytest.raises(InvalidArgument, match="missing columns"):
        simulate(parse_layout({"model": {"name": "smollm2-135m"}, "pools": [{"role": "mixed", "hardware": "cpu"}],
                               "sim": {"perf_model": str(bad)}}), synthetic(None, rate=1, duration_s=2, fixed=(4, 2)))


def test_tbt_slo_over_every_gap_exposes_prompt_interference() -> None:
    """Colocated H100s hide prompt interruptions in per-request mean TBT; over every gap they show at p99,
    while a 20 + 20 split at the same power keeps every gap short."""
    from sim.search import run_at, split_layout

    base = load_layout(REPO / "examples/sim/splitwise-hh.yaml")
    gap = base.model_copy(update={"sim": base.sim.model_copy(update={"tbt_slo_basis": "gap"})})
    conv = load_trace("conv")
    colo = run_at(split_layout(base, "dgx-h100", "dgx-h100", 0, 40), conv, 85, 30, 0)
    colo_gap = run_at(split_layout(gap, "dgx-h100", "dgx-h100", 0, 40), conv, 85, 30, 0)
    split_gap = run_at(split_layout(gap, "dgx-h100", "dgx-h100", 20, 20), conv, 85, 30, 0)
    assert colo["slowdown_slo_met"] and not colo_gap["slowdown_slo_met"]
    assert colo_gap["slowdown_tbt_gap_p99"] > 5 > split_gap["slowdown_tbt_gap_p99"]
    assert split_gap["slowdown_slo_met"]
