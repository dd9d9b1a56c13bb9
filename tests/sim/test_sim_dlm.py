"""The simulator's dlm pool: requests split by sim.dlm_fraction and conserved, service times from the measured
profile, queueing under load, cost/energy from the catalog, clear errors; and the profile command itself."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from services.contracts.errors import InvalidArgument
from services.contracts.layout import load_layout, parse_layout
from sim import catalog
from sim.cluster import simulate
from sim.dlm import load_samples
from sim.results import summarize_run
from sim.trace import make_workload

ROOT = Path(__file__).resolve().parents[2]
PROFILE = ROOT / "sim" / "data" / "dlm_profile.json"


def layout(fraction: float = 0.3, dlm_count: int = 1, dlm_hw: str = "cpu", **sim: object):
    return parse_layout({"name": "t", "pools": [{"role": "mixed", "count": 1, "hardware": "dgx-a100"},
                                                {"role": "dlm", "count": dlm_count, "hardware": dlm_hw}],
                         "model": {"name": "llama2-70b"}, "sim": {"dlm_fraction": fraction, **sim}})


def run(lay, rate: float = 2.0, duration: float = 60.0, seed: int = 1) -> tuple[dict, int]:
    wl = make_workload("fixed:256:32", rate=rate, duration_s=duration, seed=seed)
    return summarize_run(simulate(lay, wl)), len(wl)


def test_requests_are_split_and_conserved() -> None:
    res, n = run(layout(0.3))
    d = res["dlm"]
    assert res["entered"] + d["requests"] == n  # every request went to exactly one side
    assert res["completed"] + res["rejected"] + res["unfinished"] == res["entered"]
    assert d["completed"] + d["unfinished"] == d["requests"] and d["unfinished"] == 0
    assert 0.2 < d["requests"] / n < 0.4
    assert res["cluster_cost_per_hour"] == pytest.approx(res["cost_per_hour"] + catalog.hardware("cpu").cost_per_hour)


def test_light_load_latency_is_the_profiled_service_time() -> None:
    lay = layout(0.3)
    samples = load_samples(lay, "cpu", "pools.1.hardware")
    d = run(lay, rate=0.5)[0]["dlm"]  # far below capacity: no queueing
    assert samples.min() <= d["latency_p50_s"] <= d["latency_p99_s"] <= samples.max()
    assert d["queue_p99_s"] == 0.0
    assert d["utilization"] == pytest.approx(d["completed"] * d["latency_mean_s"] / d["duration_s"], rel=0.05)
    hw = catalog.hardware("cpu")
    assert hw.power_idle_w < d["power_mean_w"] < hw.power_peak_w


def test_overload_queues_and_more_machines_help() -> None:
    slow = {"dlm_variant": "baseline"}
    mean_s = json.loads(PROFILE.read_text())["hardware"]["cpu"]["variants"]["baseline"]["mean_s"]
    rate = 2 * 1.6 / mean_s  # half the requests go to the dlm pool: 1.6x one machine's capacity
    one = run(layout(0.5, 1, **slow), rate=rate, duration=20.0)[0]["dlm"]
    four = run(layout(0.5, 4, **slow), rate=rate, duration=20.0)[0]["dlm"]
    assert one["queue_p99_s"] > 1.0 and one["utilization"] > 0.9
    assert four["latency_p99_s"] < one["latency_p99_s"] / 5
    assert four["cost_per_hour"] == pytest.approx(4 * one["cost_per_hour"])
    drained = run(layout(0.5, 1, drain_s=0.0, **slow), rate=rate, duration=20.0)[0]["dlm"]
    assert drained["unfinished"] > 0 and drained["completed"] + drained["unfinished"] == drained["requests"]


def test_variants_order_like_the_profile() -> None:
    lat = {v: run(layout(0.3, dlm_variant=v), rate=0.5)[0]["dlm"]["latency_mean_s"] for v in ("baseline", "guided")}
    assert lat["guided"] < lat["baseline"]


def test_no_dlm_pool_means_no_dlm_section() -> None:
    lay = parse_layout({"pools": [{"role": "mixed", "count": 1, "hardware": "dgx-a100"}],
                        "model": {"name": "llama2-70b"}})
    res, n = run(lay)
    assert "dlm" not in res and res["entered"] == n


@pytest.mark.parametrize("lay, param", [
    (lambda: parse_layout({"pools": [{"role": "mixed"}], "sim": {"dlm_fraction": 0.2}}), "sim.dlm_fraction"),
    (lambda: layout(dlm_hw="dgx-h100"), "pools.1.hardware"),  # not profiled
    (lambda: layout(dlm_variant="turbo"), "sim.dlm_variant"),
    (lambda: layout(dlm_profile="/no/such/profile.json"), "sim.dlm_profile"),
])
def test_errors_name_the_field(lay, param: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        run(lay())
    assert err.value.param == param and err.value.message.startswith(param)


def test_fraction_must_be_below_one() -> None:
    with pytest.raises(InvalidArgument, match="sim.dlm_fraction"):
        layout(1.0)


def test_bundled_profile_is_of_the_shipped_checkpoint() -> None:
    doc = json.loads(PROFILE.read_text())
    cpu = doc["hardware"]["cpu"]
    sha = hashlib.sha256((ROOT / "services" / "dlm" / "checkpoints" / "dlm.pt").read_bytes()).hexdigest()
    assert cpu["checkpoint_sha256"] == sha, "re-run: " + cpu["command"]
    assert set(cpu["variants"]) == {"baseline", "freecache", "guided", "freecache_guided"}
    assert all(len(v["samples_s"]) == v["requests"] for v in cpu["variants"].values())


@pytest.mark.slow
def test_sim_run_cli_reports_the_dlm_share(tmp_path: Path) -> None:
    out = tmp_path / "res.json"
    proc = subprocess.run([sys.executable, "-m", "services.cli", "sim", "run", str(ROOT / "examples" / "local-dlm.yaml"),
                           "--trace", "fixed:64:16", "--rate", "2", "--duration", "30", "--out", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    res = json.loads(out.read_text())
    assert res["dlm"]["requests"] > 0 and res["dlm"]["completed"] == res["dlm"]["requests"]
    assert "dlm pool" in proc.stderr
    assert load_layout(ROOT / "examples" / "local-dlm.yaml").sim.dlm_fraction == 0.2


@pytest.mark.slow
def test_profile_command_measures_and_merges(tmp_path: Path) -> None:
    out = tmp_path / "p.json"
    out.write_text(json.dumps({"hardware": {"h200": {"variants": {}}}}))
    from typer.testing import CliRunner

    from services.cli import app

    res = CliRunner().invoke(app, ["dlm", "profile", "--json", str(out), "--n", "2", "--hardware", "cpu"])
    assert res.exit_code == 0, res.output
    doc = json.loads(out.read_text())
    assert set(doc["hardware"]) == {"h200", "cpu"}  # the other machine's entry is kept
    v = doc["hardware"]["cpu"]["variants"]
    assert all(len(x["samples_s"]) == 2 and min(x["samples_s"]) > 0 for x in v.values())
    # guided commits many drafts per forward: fewer DLM forwards than the uncached baseline
    assert v["guided"]["forward_passes_mean"] < v["baseline"]["forward_passes_mean"]
    assert np.isfinite(v["baseline"]["mean_s"])


def test_docs_table_command_runs() -> None:
    """`tandem sim dlm-table` prints these rows."""
    from sim.dlm_table import rows

    out = rows(str(ROOT / "examples" / "local-dlm.yaml"), rate=4.0, duration_s=10.0, trace="fixed:64:8", seed=0)
    assert len(out) == 6 and out[2].startswith("| baseline | 1 |") and out[5].startswith("| freecache_guided | 2 |")
