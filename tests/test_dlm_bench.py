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


@pytest.mark.slow
def test_bench_dlm_rejects_bad_flags(tmp_path) -> None:
    cmd = [sys.executable, "-m", "services.cli", "bench", "dlm", "--quick", "--block", "5"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "block" in proc.stderr and "Traceback" not in proc.stderr
