"""The fusion benchmark end to end in a tiny configuration, its workload, and its input validation."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from services.bench.fusion import BenchConfig, config_from, run_bench
from services.bench.fusion_plots import plot
from services.bench.fusion_workload import EMBEDDED_SAMPLE, Shape, arrival_times, draw_jobs, load_lengths
from services.contracts.errors import InvalidArgument


def test_workload_follows_the_trace_and_poisson_arrivals() -> None:
    ctx, gen, source = load_lengths()
    assert len(gen) > len(EMBEDDED_SAMPLE) and source.endswith(".csv")  # the real trace is in the repo
    shape = Shape(scale=8, max_prompt=128, max_new=64)
    jobs, _ = draw_jobs(4000, shape, seed=3)
    new = np.array([j.max_tokens for j in jobs])
    want = np.clip(np.round(gen / 8), 2, 64)
    assert abs(np.median(new) - np.median(want)) <= 2  # same distribution, resampled
    assert new.min() >= 2 and new.max() <= 64 and max(j.prompt_len for j in jobs) <= 128
    t = np.array(arrival_times(jobs, rate_rps=5.0))
    gaps = np.diff(t)
    assert t[0] == 0 and np.all(gaps >= 0)
    assert abs(gaps.mean() - 0.2) < 0.02 and abs(gaps.std() / gaps.mean() - 1) < 0.1  # exponential: cv = 1


def test_bad_flags_fail_at_the_edge() -> None:
    with pytest.raises(InvalidArgument, match="rates"):
        config_from(True, "fast", None, "tiny", None, None, None, None, None, None, None)
    with pytest.raises(InvalidArgument, match="max_batch"):
        config_from(True, None, None, "tiny", None, None, None, 0, None, None, None)
    with pytest.raises(InvalidArgument, match="dtype"):
        config_from(True, None, None, "tiny", None, "int8", None, None, None, None, None)
    with pytest.raises(InvalidArgument, match="model"):
        run_bench(BenchConfig.quick(model="gpt-9"))


@pytest.mark.slow
def test_quick_bench_tiny_writes_the_contract_keys(tmp_path) -> None:
    out = tmp_path / "fusion.json"
    cmd = [sys.executable, "-m", "services.bench.fusion", "--quick", "--model", "tiny", "--requests", "6",
           "--loads", "2,8", "--json", str(out)]
    subprocess.run(cmd, check=True, capture_output=True, timeout=300)
    result = json.loads(out.read_text())
    for policy in ("fusion", "static", "sequential"):
        r = result[policy]
        assert r["tokens_per_s"] > 0 and 0 < r["latency_p50_s"] <= r["latency_p99_s"]
    assert result["identical_tokens"] is True
    assert len(result["runs"]) == 2
    heavy = max(result["runs"], key=lambda r: r["rate_rps"])
    assert heavy["fusion"]["mean_batch"] > 1.0 and heavy["sequential"]["mean_batch"] == 1.0
    assert heavy["static"]["padded_rows"] >= 0 and heavy["fusion"]["padded_rows"] == 0
    assert result["reorder"]["move_s"] > 0
    png = plot(result, tmp_path / "fusion.png")
    assert png.stat().st_size > 1000


@pytest.mark.slow  # starts the whole CLI (every area registers)
def test_cli_reports_bad_input_without_a_traceback() -> None:
    proc = subprocess.run([sys.executable, "-m", "services.cli", "bench", "fusion", "--rates", "0,-1"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "error: rates" in proc.stderr and "Traceback" not in proc.stderr
