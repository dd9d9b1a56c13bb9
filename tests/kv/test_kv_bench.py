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


def _kv_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "services.cli", "bench", "kv", *args], capture_output=True, text=True,
                          timeout=60)


@pytest.mark.parametrize(("args", "message"), [
    (["--ttft", "--prefill-device", "gpu0"], "--prefill-device must be 'cpu' or 'cuda:N'"),
    (["--ttft", "--decode-device", "cuda:"], "--decode-device must be 'cpu' or 'cuda:N'"),
    (["--ttft", "--mixed-device", "cuda:x"], "--mixed-device must be 'cpu' or 'cuda:N'"),
    (["--decode-device", "cuda:1"], "apply to --ttft only"),
    (["--ttft", "--ttft-model", "llama-3.2-1b", "--ttft-dtype", "bf16"], "--ttft-dtype must be one of"),
    (["--ttft", "--ttft-model", "random:tiny", "--ttft-dtype", "bfloat16"], "--ttft-dtype applies to a shape name"),
])
def test_bench_kv_rejects_bad_placement(args: list[str], message: str) -> None:
    proc = _kv_cli(*args)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr


def test_worker_device_pins_one_gpu() -> None:
    from services.bench.kv import model_for_ttft, worker_device

    assert worker_device(None, "--decode-device") == ([], {})
    assert worker_device("cpu", "--decode-device") == (["--device", "cpu"], {})
    assert worker_device("CUDA:1", "--decode-device") == (["--device", "cuda"], {"CUDA_VISIBLE_DEVICES": "1"})
    spec = model_for_ttft("llama-3.2-1b", "bfloat16", [512, 9000])
    cfg = json.loads(spec[len("random:"):])
    assert cfg["dtype"] == "bfloat16" and cfg["max_seq_len"] >= 9000 and cfg["n_layers"] == 16
    assert model_for_ttft("random:tiny", None, [16]) == "random:tiny"


@pytest.mark.slow
def test_bench_kv_ttft_places_workers(tmp_path: Path) -> None:
    out = tmp_path / "kv.json"
    proc = _kv_cli("--ttft", "--skip-throughput", "--ttft-model", "tiny", "--ttft-dtype", "bfloat16",
                   "--prefill-device", "cpu", "--decode-device", "cpu", "--mixed-device", "cpu", "--lengths", "8,40",
                   "--kv-path", "grpc,auto", "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    res = json.loads(out.read_text())
    assert "grpc_gbps" not in res and res["ttft_setup"]["devices"]["decode"] == "cpu"
    assert res["ttft_setup"]["kv_paths"] == ["grpc", "auto"] and "partial" not in res
    assert [(r["prompt_tokens"], r["kv_path"]) for r in res["ttft"]] == [(8, "grpc"), (8, "auto"), (40, "grpc"),
                                                                          (40, "auto")]
    for r in res["ttft"]:
        assert r["kv_bytes"] == r["prompt_tokens"] * 2 * 2 * 2 * 16 * 2  # layers x K,V x kv heads x head dim x bf16
        assert r["kv_exposed_s"] >= 0 and r["split_ttft_s"] > 0 and r["mixed_prefill_s"] > 0
        # on CPU, auto takes the bytes path; the split pair's greedy tokens equal the mixed worker's
        assert r["kv_path_used"] == r["kv_path_serial_used"] == "grpc"
        assert r["first_token_equal"] and r["tokens_equal_mixed"]
