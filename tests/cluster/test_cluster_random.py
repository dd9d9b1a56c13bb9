"""`tandem up` of a layout with random weights of a named shape (`model.path: random:...`, `model.dtype`) and pools
placed on devices: the workers run where the layout says, the gateway serves token ids (random weights have no
tokenizer) and refuses text clearly, and the profile's in-cluster decode ratios come back for each batch size.
The CPU version always runs; the GPU version (prefill on the first GPU, decode on the last) needs CUDA."""

from __future__ import annotations

import signal
from pathlib import Path

import grpc
import pytest
import yaml
from kit.cluster import child_named, start_up
from kit.net import free_port

from services.rpc.tandem.v1 import generation_pb2 as gpb
from services.rpc.tandem.v1 import generation_pb2_grpc as gpb_grpc

pytestmark = pytest.mark.slow


def _layout(path: Path, dtype: str, prefill: str, decode: str) -> tuple[Path, list[int]]:
    ports = [free_port(), free_port()]
    doc = {"name": "random-split", "model": {"name": "smollm2-135m", "path": "random:tiny", "dtype": dtype},
           "pools": [{"role": "prefill", "base_port": ports[0], "device": prefill},
                     {"role": "decode", "base_port": ports[1], "device": [decode]}],
           "gateway": {"http": f"127.0.0.1:{free_port()}", "grpc": f"127.0.0.1:{free_port()}"}}
    path.write_text(yaml.safe_dump(doc))
    return path, ports


def _generate(up, **kw) -> list:
    with grpc.insecure_channel(up.grpc) as ch:
        return list(gpb_grpc.GenerationStub(ch).Generate(gpb.GenerateRequest(**kw), timeout=120))


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(x.decode().split("=", 1) for x in raw if b"=" in x)


def _check(up, ports: list[int], devices: list[str], pins: list[str | None]) -> None:
    for role, port, device, pin in zip(("prefill", "decode"), ports, devices, pins, strict=True):
        pid = child_named(up.proc.pid, "--index", "0", "--address", f"127.0.0.1:{port}")
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
        assert argv[argv.index("--device") + 1] == device, role
        assert _environ(pid).get("CUDA_VISIBLE_DEVICES") == pin, role
    msgs = _generate(up, token_ids=gpb.TokenIds(ids=[5, 9, 17, 3]),
                     sampling=gpb.SamplingOptions(max_tokens=6, temperature=0, ignore_eos=True))
    ids = [t for m in msgs for t in m.token_ids]
    assert len(ids) == 6 and all(0 <= t < 256 for t in ids)
    assert "".join(m.text for m in msgs) == ""  # no vocabulary: ids only
    with pytest.raises(grpc.RpcError) as err:
        _generate(up, text="hello", sampling=gpb.SamplingOptions(max_tokens=4))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "random weights" in err.value.details() and "token ids" in err.value.details()


def test_random_weights_on_the_cpu(tmp_path: Path) -> None:
    from services.bench.profile import batch_step_ratios

    layout, ports = _layout(tmp_path / "layout.yaml", "bfloat16", "cpu", "cpu")
    up = start_up(layout, tmp_path / "logs")
    try:
        _check(up, ports, ["cpu", "cpu"], [None, None])
        ratios = batch_step_ratios(up.grpc, lambda b, ctx: 0.01, [1, 2], output=8, prompt=8)
        assert set(ratios) == {"decode_step_ratio@1", "decode_step_ratio@2"} and all(v > 0 for v in ratios.values())
    finally:
        up.stop(signal.SIGTERM)


@pytest.mark.gpu
def test_random_weights_pinned_to_gpus(tmp_path: Path) -> None:
    import subprocess

    import torch

    from services.cluster.launcher import placement

    last = torch.cuda.device_count() - 1
    layout, ports = _layout(tmp_path / "layout.yaml", "bfloat16", "cuda:0", f"cuda:{last}")
    pins = [placement(d)[1]["CUDA_VISIBLE_DEVICES"] for d in ("cuda:0", f"cuda:{last}")]
    up = start_up(layout, tmp_path / "logs")
    try:
        _check(up, ports, ["cuda", "cuda"], pins)
        # for the log: which processes hold which GPU (a container may hide the pids)
        print(subprocess.run(["nvidia-smi", "--query-compute-apps=pid,gpu_bus_id,used_memory", "--format=csv"],
                             capture_output=True, text=True).stdout)
    finally:
        up.stop(signal.SIGTERM)
