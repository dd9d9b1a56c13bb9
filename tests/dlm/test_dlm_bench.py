"""`tandem bench dlm` end to end in a tiny configuration: the contract's JSON keys and passing exact checks."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

VARIANTS = ("baseline", "freecache", "guided", "freecache_guided")


@pytest.mark.slow
def test_bench_dlm_quick_json(tmp_path) -> None:
    out = tmp_path / "dlm.json"
    cmd = [sys.executable, "-m", "services.cli", "bench", "dlm", "--quick", "--n", "3", "--exact-prompts", "1",
           "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    res = json.loads(out.read_text())
    for name in VARIANTS:
        for key in ("accuracy", "token_agreement", "forward_passes", "seconds"):
            assert isinstance(res[name][key], float | int), (name, key)
        assert 0.0 <= res[name]["accuracy"] <= 1.0
    assert res["baseline"]["token_agreement"] == 1.0
    assert res["baseline"]["forward_passes"] == 24.0 and res["guided"]["forward_passes"] < 24.0
    assert res["freecache"]["dlm_tokens"] < res["baseline"]["dlm_tokens"]
    assert res["exact_checks"] and all(res["exact_checks"].values())
    # The documented bench configuration (docs/dlm.md): B=2, s=2, FreeCache's linear work cut exactly as counted.
    assert (res["config"]["block"], res["config"]["steps_per_block"]) == (2, 2)
    assert res["baseline"]["dlm_tokens"] == 24 * 48 and res["freecache"]["dlm_tokens"] == 24 + 2 * sum(range(2, 25, 2))
    # The batched table (all 3 prompts in one batch): same tokens as one at a time, same linear work per prompt.
    bt = res["batched"]
    assert bt["batch"] == 3 and set(bt) >= {"baseline", "freecache", "refresh_block"}
    assert bt["baseline"]["accuracy"] == res["baseline"]["accuracy"]
    assert bt["freecache"]["token_agreement"] == res["freecache"]["token_agreement"]
    assert bt["freecache"]["dlm_tokens"] == res["freecache"]["dlm_tokens"]
    assert bt["baseline"]["forward_passes"] == 24  # one forward per step for the whole batch


@pytest.mark.slow
def test_bench_dlm_rejects_bad_flags(tmp_path) -> None:
    cmd = [sys.executable, "-m", "services.cli", "bench", "dlm", "--quick", "--block", "5"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "block" in proc.stderr and "Traceback" not in proc.stderr
    proc = subprocess.run(cmd[:-2] + ["--batch", "-1"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--batch" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_evaluate_sweep_and_table(tmp_path) -> None:
    """`tandem dlm evaluate --sweep` runs baseline and FreeCache per B x s on a dev seed; `--table` re-prints its rows."""
    out = tmp_path / "sweep.json"
    cmd = [sys.executable, "-m", "services.cli", "dlm", "evaluate", "--n", "3", "--seed", "4242", "--sweep", "2x2,4x1",
           "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    res = json.loads(out.read_text())
    assert set(res) == {"B2_s2", "B4_s1"}
    assert set(res["B2_s2"]) == {"baseline", "freecache"}
    assert res["B2_s2"]["freecache"]["linear_work_reduction"] == pytest.approx(1152 / 336)
    table = subprocess.run([sys.executable, "-m", "services.cli", "dlm", "evaluate", "--table", str(out)],
                           capture_output=True, text=True, timeout=60)
    assert table.returncode == 0, table.stderr
    assert len(table.stdout.strip().splitlines()) == 4 and "| 2 | 2 | 12 |" in table.stdout
