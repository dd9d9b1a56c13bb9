"""`tandem bench cluster` smoke test: a tiny checkpoint's one-worker cluster, a very short scaled trace."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
KEYS = ("ttft_p50_s", "ttft_p99_s", "tbt_p50_s", "tbt_p99_s", "e2e_p50_s", "e2e_p99_s", "throughput_rps",
        "tokens_per_s", "completed", "dropped", "slo_attainment")

pytestmark = pytest.mark.slow  # starts a cluster (gateway + worker processes)


def test_bench_cluster_replays_a_scaled_trace_and_reports_the_sim_keys(tmp_path: Path) -> None:
    from kit.checkpoints import tiny_config, write_tiny_checkpoint

    ckpt = write_tiny_checkpoint(tmp_path / "tiny", tiny_config(max_seq_len=1024))
    layout = tmp_path / "layout.yaml"  # ports: the bench moves them to free ones
    layout.write_text(yaml.safe_dump({"name": "tiny-mixed", "model": {"name": "smollm2-135m", "path": str(ckpt)},
                                      "pools": [{"role": "mixed", "count": 1}]}))
    out = tmp_path / "measured.json"
    run = subprocess.run([sys.executable, "-m", "services.cli", "bench", "cluster", str(layout), "--trace", "conv",
                          "--rate", "3", "--duration", "2", "--seed", "2", "--json", str(out)],
                         capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "120"})
    assert run.returncode == 0, run.stderr[-3000:]
    res = json.loads(out.read_text())
    for k in KEYS:
        assert isinstance(res[k], int | float), k
    assert res["completed"] == res["requests"] > 0 and res["dropped"] == 0
    assert res["ttft_p50_s"] <= res["ttft_p99_s"] <= res["e2e_p99_s"]
    assert len(res["samples"]["ttft_s"]) == res["completed"]
    # the workload that was replayed, scaled and clipped, as a trace the simulator can replay
    rows = Path(res["workload_csv"]).read_text().splitlines()
    assert rows[0] == "TIMESTAMP,ContextTokens,GeneratedTokens" and len(rows) == res["requests"] + 1
    sizes = [tuple(map(int, r.split(",")[1:])) for r in rows[1:]]
    assert all(4 <= p <= 256 and 2 <= o <= 32 for p, o in sizes)
