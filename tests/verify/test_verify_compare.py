"""`tandem compare` on hand-made results: relative errors, the table, the CDF plot, missing samples."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from services.bench.compare import compare, plot_cdfs, relative_error
from services.contracts.errors import InvalidArgument

REPO = Path(__file__).resolve().parents[2]
PRED = {"ttft_p50_s": 0.11, "ttft_p99_s": 0.30, "tbt_p50_s": 0.05, "tbt_p99_s": 0.08, "e2e_p50_s": 1.0,
        "e2e_p99_s": 2.4, "completed": 10, "cost_per_hour": 0.1,
        "samples": {"ttft_s": [0.1, 0.12, 0.3], "tbt_mean_s": [0.05, 0.06], "e2e_s": [1.0, 2.4]}}
MEAS = {"ttft_p50_s": 0.10, "ttft_p99_s": 0.40, "tbt_p50_s": 0.05, "tbt_p99_s": 0.0, "e2e_p50_s": 1.25,
        "e2e_p99_s": None, "completed": 10, "wall_s": 3.0,
        "samples": {"ttft_s": [0.1, 0.4], "tbt_mean_s": [0.05], "e2e_s": [1.25]}}


def test_relative_error_per_key() -> None:
    cmp = compare(PRED, MEAS)
    err = cmp["relative_error"]
    assert err["ttft_p50_s"] == pytest.approx(0.10)
    assert err["ttft_p99_s"] == pytest.approx(-0.25)
    assert err["tbt_p50_s"] == 0.0
    assert err["e2e_p50_s"] == pytest.approx(-0.2)
    assert err["tbt_p99_s"] is None and err["e2e_p99_s"] is None  # measured 0 / missing: no ratio
    assert err["completed"] == 0.0
    assert "cost_per_hour" not in err and "wall_s" not in err  # only keys both sides carry
    assert relative_error(float("nan"), 1.0) is None
    with pytest.raises(InvalidArgument, match="share none"):
        compare({"a": 1}, {"b": 2})


def test_plot_needs_samples_in_both(tmp_path: Path) -> None:
    assert plot_cdfs(PRED, MEAS, tmp_path / "c.png")
    assert (tmp_path / "c.png").stat().st_size > 1000
    assert not plot_cdfs({k: v for k, v in PRED.items() if k != "samples"}, MEAS, tmp_path / "d.png")


@pytest.mark.slow  # one `tandem` process
def test_compare_command_prints_the_table_and_writes_json(tmp_path: Path) -> None:
    p, m, out = tmp_path / "p.json", tmp_path / "m.json", tmp_path / "cmp.json"
    p.write_text(json.dumps(PRED))
    m.write_text(json.dumps(MEAS))
    run = subprocess.run([sys.executable, "-m", "services.cli", "compare", str(p), str(m), "--plot",
                          str(tmp_path / "c.png"), "--json", str(out)], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "120"})
    assert run.returncode == 0, run.stderr
    assert "ttft_p50_s" in run.stdout and "+10.0%" in run.stdout and "-20.0%" in run.stdout
    res = json.loads(out.read_text())
    assert set(res) == {"predicted", "measured", "relative_error"}
    assert res["relative_error"]["ttft_p99_s"] == pytest.approx(-0.25)
