"""The kv_path setting (auto | grpc | ipc) where CUDA is absent: accepted values do something, the rest is refused.

The CUDA IPC path itself runs in tests/workers/test_kv_ipc_gpu.py (GPU only); here: validation at every edge
(worker option, layout, bench flag, PrefillBatcher), the decode side's refusal on CPU, and `auto` on CPU
choosing the bytes path (the end-to-end check of that is in tests/workers/test_workers_e2e.py).
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from services.contracts.errors import InvalidArgument
from services.contracts.layout import parse_layout
from services.kv.ipc import IpcReceiver, IpcRefused, check_kv_path, host_id
from services.rpc.tandem.v1 import worker_pb2 as pb
from services.workers.modelspec import load_model
from services.workers.prefill import PrefillBatcher


def test_check_kv_path_values_and_device() -> None:
    for value in ("auto", "grpc", "ipc"):
        assert check_kv_path(value) == value
    assert check_kv_path("auto", torch.device("cpu")) == "auto"
    with pytest.raises(InvalidArgument, match="kv_path must be one of auto, grpc, ipc") as exc:
        check_kv_path("rdma")
    assert exc.value.param == "kv_path"
    with pytest.raises(InvalidArgument, match="kv_path 'ipc' needs the worker's model on a CUDA device \\(it is on cpu\\)"):
        check_kv_path("ipc", torch.device("cpu"))


def test_prefill_batcher_refuses_ipc_on_cpu_and_auto_means_bytes() -> None:
    engine = load_model("random:tiny")
    with pytest.raises(InvalidArgument, match="kv_path 'ipc'"):
        PrefillBatcher(engine, kv_path="ipc")
    for path in ("auto", "grpc"):
        b = PrefillBatcher(engine, kv_path=path)
        try:
            assert b.use_ipc is False
        finally:
            b.stop()


def test_decode_side_refuses_shared_kv_without_cuda_or_with_grpc() -> None:
    header = pb.KVSharedHeader(host_id=host_id(), pid=1, device_uuid="GPU-x")
    with pytest.raises(IpcRefused, match="model is on cpu, not CUDA") as exc:
        IpcReceiver(torch.device("cpu")).check(header)
    assert exc.value.code == "FAILED_PRECONDITION"
    with pytest.raises(IpcRefused, match="over gRPC only \\(kv_path grpc\\)"):
        IpcReceiver(torch.device("cpu"), "grpc").check(header)
    with pytest.raises(InvalidArgument, match="kv_path 'ipc'"):
        IpcReceiver(torch.device("cpu"), "ipc")


def test_worker_process_refuses_ipc_on_cpu() -> None:
    proc = subprocess.run([sys.executable, "-m", "services.workers.server", "prefill", "--model", "random:tiny",
                           "--device", "cpu", "--kv-path", "ipc"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "error: kv_path 'ipc' needs the worker's model on a CUDA device (it is on cpu)" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "services.workers.server", "prefill", "--kv-path", "rdma"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "invalid choice: 'rdma'" in proc.stderr


def test_layout_kv_link_path() -> None:
    assert parse_layout({}).kv_link.path == "auto"
    assert parse_layout({"kv_link": {"path": "ipc"}}).kv_link.path == "ipc"
    with pytest.raises(InvalidArgument, match="kv_link.path") as exc:
        parse_layout({"kv_link": {"path": "rdma"}})
    assert exc.value.param == "kv_link.path"


@pytest.mark.parametrize(("args", "message"), [
    (["--kv-path", "grpc"], "apply to --ttft only"),
    (["--ttft", "--kv-path", "grpc,rdma"], "--kv-path must be distinct names among grpc, ipc, auto"),
    (["--ttft", "--kv-path", "grpc,grpc"], "--kv-path must be distinct names"),
    (["--ttft", "--kv-path", "ipc"], "--kv-path ipc needs --prefill-device and --decode-device on the same GPU"),
    (["--ttft", "--kv-path", "ipc", "--prefill-device", "cuda:0", "--decode-device", "cuda:1"],
     "on the same GPU, e.g. cuda:0 for both (got 'cuda:0' and 'cuda:1')"),
])
def test_bench_kv_path_flag_is_checked_before_any_worker_starts(args: list[str], message: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "services.cli", "bench", "kv", *args], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
