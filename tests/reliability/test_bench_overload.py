"""`tandem bench overload` end to end on a tiny checkpoint (one round, both clients, both scenarios): the verb is
registered, starts its own cluster, writes its JSON; the raw burst admits exactly the capacity and refuses the
rest with Retry-After, a burst while every place is held is refused whole, every accepted request completes,
and the server-side figures (refusal histogram, event-loop schedstat) were read."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def test_bench_overload_one_round(tmp_path: Path) -> None:
    from kit.checkpoints import tiny_config, write_tiny_checkpoint

    tiny = write_tiny_checkpoint(tmp_path / "tiny", tiny_config(max_seq_len=1024))
    out = tmp_path / "overload.json"
    res = subprocess.run([sys.executable, "-m", "services.cli", "bench", "overload", "--model", str(tiny),
                          "--rounds", "1", "--max-tokens", "32", "--hold-tokens", "600", "--json", str(out),
                          "--log-dir", str(tmp_path / "run")], capture_output=True, text=True, timeout=400)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    doc = json.loads(out.read_text())
    assert doc["config"]["capacity"] == 16 and doc["config"]["model"] == "tiny"
    rows = {(r["client"], r["scenario"]): r for r in doc["rows"]}
    assert set(rows) == {(c, s) for c in ("raw", "httpx") for s in ("burst", "full")}
    for r in rows.values():
        assert r["other"] == {} and r["accepted"] + r["refused"] == r["sent"]
        assert r["completed"] == r["accepted_total"] and r["retry_after"] == r["refused"]
    assert (rows["raw", "burst"]["accepted"], rows["raw", "burst"]["refused"]) == (16, 48)
    assert (rows["raw", "full"]["accepted"], rows["raw", "full"]["refused"]) == (0, 48)
    assert rows["raw", "full"]["accepted_total"] == 16  # the holders, all completed
    raw = [r for r in doc["rounds"] if r["client"] == "raw"]
    assert all(r["loop_ran_ms"] > 0 and len(r["refused_ms"]) == 48 for r in raw)
    assert rows["raw", "burst"]["door_p99_le_ms"] is not None
    assert "sent over ms" in res.stdout
