"""Placing workers on devices (`pools[].device`): the processes `tandem up` plans (argv and environment), the
environment a started child really gets, the device check before anything starts, `tandem serve --device`, and
what `tandem compose` / `tandem k8s` make of a GPU pool. None of it needs a GPU."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from kit.compose import validate

from services.cluster.compose import GPU_IMAGE, compose_doc
from services.cluster.k8s import manifests
from services.cluster.launcher import Cluster, ProcSpec, check_devices, placement, plan
from services.contracts.errors import InvalidArgument
from services.contracts.layout import parse_layout

ROOT = Path(__file__).resolve().parents[2]
SPLIT = {"pools": [{"role": "prefill", "device": "cuda:0"},
                   {"role": "decode", "count": 2, "device": ["cuda:1", "cpu"]},
                   {"role": "mixed", "count": 1}]}


def test_up_pins_each_worker_to_its_gpu() -> None:
    specs = {s.name: s for s in plan(parse_layout(SPLIT), "layout.yaml")}
    pre, d0, d1, mixed, gw = (specs[n] for n in ("prefill-0", "decode-0", "decode-1", "mixed-0", "gateway"))
    assert pre.argv[3:] == ["serve", "prefill", "--layout", "layout.yaml", "--device", "cuda", "--index", "0",
                            "--address", "127.0.0.1:50100"]
    assert pre.env == {"CUDA_VISIBLE_DEVICES": "0"}
    assert d0.argv[d0.argv.index("--device") + 1] == "cuda" and d0.env == {"CUDA_VISIBLE_DEVICES": "1"}
    assert d1.argv[d1.argv.index("--device") + 1] == "cpu" and d1.env == {}
    assert "--device" not in mixed.argv and mixed.env == {}  # no device: the worker picks
    assert "--device" not in gw.argv and gw.env == {}  # the gateway runs on the host CPU


def test_placement_counts_the_gpus_this_process_sees() -> None:
    assert placement("cuda:1", visible="") == (["--device", "cuda"], {"CUDA_VISIBLE_DEVICES": "1"})
    assert placement("cuda:1", visible="4,6") == (["--device", "cuda"], {"CUDA_VISIBLE_DEVICES": "6"})
    assert placement("cuda", visible="4,6") == (["--device", "cuda"], {})
    assert placement(None) == ([], {})
    with pytest.raises(InvalidArgument) as err:
        placement("cuda:2", "pools.3.device", visible="4,6")
    assert err.value.param == "pools.3.device" and "CUDA_VISIBLE_DEVICES='4,6'" in str(err.value)


def test_a_started_child_gets_its_pinning(tmp_path: Path) -> None:
    show = [sys.executable, "-c", "import os; print('seen', os.environ.get('CUDA_VISIBLE_DEVICES'))"]
    cluster = Cluster([ProcSpec("a", show, env={"CUDA_VISIBLE_DEVICES": "1"}), ProcSpec("b", show)], tmp_path)
    cluster.start()
    for p in cluster.procs.values():
        p.wait(30)
    assert (tmp_path / "a.log").read_text().strip() == "seen 1"
    assert (tmp_path / "b.log").read_text().strip() == f"seen {os.environ.get('CUDA_VISIBLE_DEVICES')}"


def test_devices_are_checked_against_the_machine() -> None:
    lay = parse_layout(SPLIT)
    with pytest.raises(InvalidArgument) as err:
        check_devices(lay, gpus=0)
    assert err.value.param == "pools.0.device" and "CUDA is not available on this machine" in str(err.value)
    with pytest.raises(InvalidArgument) as err:
        check_devices(lay, gpus=1)
    assert err.value.param == "pools.1.device" and "asks for GPU 1" in str(err.value) and "1 GPU(s)" in str(err.value)
    check_devices(lay, gpus=2)
    check_devices(parse_layout({"pools": [{"role": "mixed", "device": "cpu"}]}), gpus=0)


def test_up_refuses_a_gpu_layout_without_cuda(tmp_path: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    layout = tmp_path / "gpu.yaml"
    layout.write_text(yaml.safe_dump({"model": {"path": "random:tiny"}, "pools": [{"role": "mixed", "device": "cuda:0"}]}))
    t0 = time.monotonic()
    run = subprocess.run([sys.executable, "-m", "services.cli", "up", str(layout), "--log-dir", str(tmp_path / "logs")],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert run.returncode == 2, run.stderr
    assert "pools.0.device: 'cuda:0' needs a CUDA GPU, and CUDA is not available on this machine" in run.stderr
    assert not (tmp_path / "logs").exists()  # refused before any process started
    assert time.monotonic() - t0 < 120


def test_serve_refuses_a_bad_device() -> None:
    run = subprocess.run([sys.executable, "-m", "services.cli", "serve", "mixed", "--device", "gpu0"],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert run.returncode == 2
    assert "--device: must be 'cpu', 'cuda' or 'cuda:N'" in run.stderr and "gpu0" in run.stderr


def test_compose_reserves_the_named_gpu() -> None:
    doc = compose_doc(parse_layout(SPLIT))
    assert validate(doc) == []
    pre, d0, d1, mixed = (doc["services"][n] for n in ("prefill-0", "decode-0", "decode-1", "mixed-0"))
    assert pre["command"][:7] == ["tandem", "serve", "prefill", "--layout", "/etc/tandem/layout.yaml", "--device", "cuda"]
    assert pre["image"] == GPU_IMAGE and pre["build"]["args"]["TORCH_INDEX"].endswith("/cu128")
    assert pre["deploy"]["resources"]["reservations"]["devices"] == [
        {"driver": "nvidia", "capabilities": ["gpu"], "device_ids": ["0"]}]
    assert d0["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"] == ["1"]
    assert d1["command"][5:7] == ["--device", "cpu"] and "deploy" not in d1 and d1["image"] == "tandem:latest"
    assert "--device" not in mixed["command"] and "deploy" not in mixed
    assert "deploy" not in doc["services"]["gateway"]


def test_k8s_gives_a_gpu_pool_one_gpu_per_pod() -> None:
    lay = parse_layout({"pools": [{"role": "prefill", "device": "cuda:0"}, {"role": "decode", "device": "cuda:1"}]})
    docs = manifests(lay)
    for pool in ("prefill", "decode"):
        c = docs[f"{pool}-deployment.yaml"]["spec"]["template"]["spec"]["containers"][0]
        assert c["args"][4:6] == ["--device", "cuda"]  # the pod sees the GPU it was given as its only one
        assert c["resources"]["limits"] == {"nvidia.com/gpu": 1} and c["image"] == "tandem-gpu:latest"
    with pytest.raises(InvalidArgument) as err:
        manifests(parse_layout(SPLIT))
    assert err.value.param == "pools.1.device" and "cannot mix cpu and cuda" in str(err.value)
