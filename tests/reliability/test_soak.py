"""`tandem bench soak` on a small scale against a real split cluster (tiny checkpoint, `tandem up`, API keys on):
every request is either served in full, cancelled by the client on purpose, or refused exactly as it was built to
be; and afterwards every decode worker's KV in use is back to zero. Plus the bug the full soak found: a worker
holding as many requests as it admits must still answer Info (else the gateway's poller drops it as dead)."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from kit.cluster import start_up, write_layout
from kit.net import free_port

pytestmark = pytest.mark.slow
KEY = "soak-test-key"


def test_a_short_soak_has_no_unexpected_error_and_frees_all_kv(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from kit.checkpoints import tiny_config, write_tiny_checkpoint

    from services.bench.soak import SoakConfig, run_soak, sized_layout
    from services.bench.soak_plot import plot

    tiny = write_tiny_checkpoint(tmp_path / "tiny", tiny_config(max_seq_len=512))
    pools = [{"role": "prefill", "count": 1, "base_port": free_port()},
             {"role": "decode", "count": 1, "base_port": free_port()},
             {"role": "decode", "count": 1, "base_port": free_port()}]
    base = write_layout(tmp_path / "base.yaml", str(tiny), pools, free_port(), free_port(), name="soak",
                        batching={"max_batch": 4, "max_waiting": 4})
    layout = sized_layout(base, 16, tmp_path / "layout.yaml")  # what the soak does to a cluster it starts
    monkeypatch.setenv("TANDEM_API_KEYS", KEY)  # the gateway `tandem up` starts reads it
    up = start_up(layout, tmp_path / "logs")
    try:
        cfg = SoakConfig(streams=16, duration_s=15.0, max_tokens=48, cancel_share=0.25, invalid_rate=4.0,
                         ramp_s=2.0, sample_s=0.5, settle_s=60.0, seed=3)
        res = run_soak(layout, cfg, attach=True, api_key=KEY)
    finally:
        up.stop()
    assert res["unexpected"] == 0, res["unexpected_examples"]
    assert res["kv_back_to_zero"], (res["kv_in_use_after_bytes"], res["live_after"])
    assert set(res["kv_in_use_after_bytes"]) == {"decode-0", "decode-1"}
    assert max(res["kv_in_use_max_bytes"].values()) > 0  # the watcher did see KV in use during the load
    kinds = res["deliberate_by_kind"]
    for kind in ("bad_json", "bad_field", "unknown_field", "oversize", "wrong_key", "grpc_bad_field",
                 "grpc_oversize", "grpc_wrong_key"):
        assert kinds.get(f"invalid:{kind}", 0) >= 1, kinds
    assert any(k.startswith("cancel:http") for k in kinds) and any(k.startswith("cancel:grpc") for k in kinds), kinds
    assert res["completed"] >= cfg.streams and res["client_inflight_max"] == cfg.streams
    assert {k.split("-")[0] for k in res["completed_by_label"]} == {"http", "grpc"}
    assert set(res["rss_mb"]) == {"prefill-0", "decode-0", "decode-1", "gateway"}
    assert all(r["max"] > 0 for r in res["rss_mb"].values())
    assert res["process_restarts"] == []
    assert plot(res, tmp_path / "soak.png").stat().st_size > 0


def test_a_prefill_worker_holding_all_it_admits_still_answers_info(tmp_path: Path) -> None:
    """41 prompts held (max_batch 1 + max_waiting 40) while their KV pushes hang on a peer that never answers:
    each Prefill call holds a server thread. With a pool smaller than what the worker admits (it was
    max(32, 2 x max_batch + 16) = 32 threads), the next call and Info waited behind them and timed out (the
    gateway's poller, which allows Info 1 s, then dropped the worker as dead)."""
    from services.contracts.errors import ResourceExhausted, TandemError
    from services.engine.sampling import SamplingParams
    from services.grpcutil import wait_healthy
    from services.workers.client import WorkerClient

    held = 41
    silent = socket.socket()  # accepts TCP connections (backlog) and never speaks HTTP/2
    silent.bind(("127.0.0.1", 0))
    silent.listen(held + 8)
    peer = f"127.0.0.1:{silent.getsockname()[1]}"
    addr = f"127.0.0.1:{free_port()}"
    proc = subprocess.Popen([sys.executable, "-m", "services.workers.server", "prefill", "--model", "random:tiny",
                             "--address", addr, "--max-batch", "1", "--max-waiting", str(held - 1)],
                            stderr=(tmp_path / "prefill.log").open("w"))
    client = WorkerClient(addr)
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)

    def prefill(rid: str, timeout: float) -> None:
        client.prefill(rid, [5, 6, 7], params, peer, timeout=timeout, kv_timeout=120.0)

    def hold(i: int) -> None:
        while True:  # until held: a place a probe took is given back at the probe's deadline
            try:
                prefill(f"held-{i}", 120.0)
            except ResourceExhausted:
                time.sleep(0.2)
                continue
            except Exception:  # noqa: BLE001 - the worker stopped (or the channel closed) at the end of the test
                pass
            return

    try:
        wait_healthy(addr, 120)
        for i in range(held):
            threading.Thread(target=hold, args=(i,), daemon=True).start()
        refused, deadline = None, time.monotonic() + 90
        while refused is None and time.monotonic() < deadline:  # one more is refused once all are held
            try:
                prefill("probe", 5.0)
            except ResourceExhausted as exc:
                refused = exc
            except TandemError:  # DeadlineExceeded: not answered (queued behind the held calls), or admitted
                time.sleep(0.3)
        assert refused is not None, "the worker never refused a prompt beyond max_batch + max_waiting"
        assert client.info(timeout=5.0).role == "prefill"  # queued behind the held calls, it never answered
    finally:
        proc.kill()
        proc.wait(10)
        client.close()
        silent.close()
