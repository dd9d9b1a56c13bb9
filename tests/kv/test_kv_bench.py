"""`tandem bench kv` runs end to end (small) and writes the contract's JSON keys; bad flags exit 2 cleanly."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
def test_bench_kv_writes_contract_keys(tmp_path: Path) -> None:
    out = tmp_path / "kv.json"
    proc = subprocess.run([sys.executable, "-m", "services.cli", "bench", "kv", "--tokens", "256", "--repeats", "1",
                           "--json", str(out)], capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    res = json.loads(out.read_text())
    assert res["grpc_gbps"] > 0 and res["raw_tcp_gbps"] > 0
    assert res["ratio"] == pytest.approx(res["grpc_gbps"] / res["raw_tcp_gbps"])
    assert res["bytes_per_transfer"] == 256 * 8 * 2 * 8 * 128 * 4


def test_bench_kv_rejects_bad_chunk_size() -> None:
    proc = subprocess.run([sys.executable, "-m", "services.cli", "bench", "kv", "--chunk-mb", "16"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "error: chunk_bytes must be in" in proc.stderr
