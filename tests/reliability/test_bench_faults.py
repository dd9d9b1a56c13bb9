"""`tandem bench faults` end to end on a tiny checkpoint (two quick scenarios): the verb is registered, starts
its own cluster and Redis, writes its JSON, and every accepted stream matches the fault-free reference."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def test_bench_faults_redis_pause_and_corrupt(tmp_path: Path) -> None:
    from kit.checkpoints import tiny_config, write_tiny_checkpoint

    tiny = write_tiny_checkpoint(tmp_path / "tiny", tiny_config(max_seq_len=512))
    out = tmp_path / "faults.json"
    res = subprocess.run([sys.executable, "-m", "services.cli", "bench", "faults", "--model", str(tiny),
                          "--streams", "4", "--max-tokens", "40", "--ttl-s", "1", "--only", "redis-pause,corrupt",
                          "--json", str(out), "--log-dir", str(tmp_path / "run")],
                         capture_output=True, text=True, timeout=400)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    doc = json.loads(out.read_text())
    assert doc["config"]["streams"] == 4 and doc["config"]["ttl_s"] == 1.0
    pause, corrupt = doc["scenarios"]
    assert pause["scenario"] == "redis-pause" and pause["accepted"] == pause["identical"] == 4
    assert pause["lost"] == 0 and pause["recovery_s"] is not None
    assert corrupt["fault"].startswith("1 KV chunk(s) corrupted")
    assert corrupt["completed"] == corrupt["identical"] and corrupt["lost"] == 0
    assert corrupt["completed"] + corrupt["rejected"] == 4
    assert "redis-pause" in res.stdout and "identical" in res.stdout
