"""The one-machine shape (`tandem up` with one mixed worker + gateway) over real processes, tiny checkpoint."""

from __future__ import annotations

import signal
import time

import grpc
import httpx
import pytest
from conftest import free_port
from kit.cluster import alive, start_up, write_layout

from services.engine.sampling import SamplingParams
from services.rpc.tandem.v1 import generation_pb2 as gpb
from services.rpc.tandem.v1 import generation_pb2_grpc as gpb_grpc

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    from kit.checkpoints import tiny_config, write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", tiny_config(max_seq_len=4096))


@pytest.fixture(scope="module")
def cluster(tiny, tmp_path_factory: pytest.TempPathFactory):
    d = tmp_path_factory.mktemp("mixed")
    layout = write_layout(d / "layout.yaml", str(tiny), [{"role": "mixed", "count": 1, "base_port": free_port()}],
                          free_port(), free_port(), name="tiny-mixed")
    up = start_up(layout, d / "logs")
    yield up
    up.stop(signal.SIGTERM)


def mixed_info(up):
    from services.workers.client import WorkerClient

    addr = httpx.get(f"{up.http}/health").json()["workers"][0]["address"]
    with WorkerClient(addr) as c:
        return c.info()


def test_mixed_worker_greedy_equals_engine_and_frees_on_disconnect(cluster, tiny) -> None:
    from services.engine.generate import generate
    from services.engine.loader import load_engine

    engine = load_engine(str(tiny), device="cpu")
    for prompt in ("Hello world", "The capital of Italy is"):
        with grpc.insecure_channel(cluster.grpc) as ch:
            msgs = list(gpb_grpc.GenerationStub(ch).Generate(gpb.GenerateRequest(
                text=prompt, sampling=gpb.SamplingOptions(max_tokens=16, temperature=0)), timeout=60))
        ref = list(generate(engine, engine.tokenizer.encode(prompt), SamplingParams(max_tokens=16, temperature=0)))
        assert [t for m in msgs for t in m.token_ids] == ref
        last = msgs[-1]
        assert len(last.workers) == 1 and last.timings.kv_bytes == 0 and last.timings.kv_transfer_s == 0
        assert last.timings.prefill_s > 0

    body = {"model": "tiny", "prompt": "Hello", "max_tokens": 3000, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{cluster.http}/v1/completions", json=body, timeout=60) as r:
        it = r.iter_lines()
        for _ in range(6):
            next(it)
        assert mixed_info(cluster).live_requests == 1
    deadline = time.monotonic() + 10
    while (i := mixed_info(cluster)).live_requests and time.monotonic() < deadline:
        time.sleep(0.1)
    assert i.live_requests == 0 and i.kv_free_bytes == i.kv_total_bytes


def test_children_die_with_a_killed_launcher(cluster) -> None:
    # SIGKILL gives `tandem up` no chance to clean up: PR_SET_PDEATHSIG must still end its children.
    kids = cluster.children()
    assert len(kids) == 2
    cluster.stop(signal.SIGKILL)
    deadline = time.monotonic() + 20
    while any(alive(p) for p in kids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [p for p in kids if alive(p)]
