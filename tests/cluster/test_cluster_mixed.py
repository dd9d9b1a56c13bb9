"""The one-machine shape (`tandem up` with one mixed worker + gateway) over real processes, tiny checkpoint."""

from __future__ import annotations

import signal
import time

import grpc
import httpx
import pytest
from kit.cluster import alive

from services.engine.sampling import SamplingParams
from services.rpc.tandem.v1 import generation_pb2 as gpb
from services.rpc.tandem.v1 import generation_pb2_grpc as gpb_grpc

pytestmark = pytest.mark.slow


def mixed_info(up):
    from services.workers.client import WorkerClient

    addr = httpx.get(f"{up.http}/health").json()["workers"][0]["address"]
    with WorkerClient(addr) as c:
        return c.info()


def test_mixed_worker_greedy_equals_engine_and_frees_on_disconnect(mixed_cluster, tiny_engine_4k) -> None:
    from services.engine.generate import generate

    engine = tiny_engine_4k
    for prompt in ("Hello world", "The capital of Italy is"):
        with grpc.insecure_channel(mixed_cluster.grpc) as ch:
            msgs = list(gpb_grpc.GenerationStub(ch).Generate(gpb.GenerateRequest(
                text=prompt, sampling=gpb.SamplingOptions(max_tokens=16, temperature=0)), timeout=60))
        ref = list(generate(engine, engine.tokenizer.encode(prompt), SamplingParams(max_tokens=16, temperature=0)))
        assert [t for m in msgs for t in m.token_ids] == ref
        last = msgs[-1]
        assert len(last.workers) == 1 and last.timings.kv_bytes == 0 and last.timings.kv_transfer_s == 0
        assert last.timings.prefill_s > 0

    body = {"model": "tiny", "prompt": "Hello", "max_tokens": 3000, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{mixed_cluster.http}/v1/completions", json=body, timeout=60) as r:
        it = r.iter_lines()
        for _ in range(6):
            next(it)
        assert mixed_info(mixed_cluster).live_requests == 1
    deadline = time.monotonic() + 10
    while (i := mixed_info(mixed_cluster)).live_requests and time.monotonic() < deadline:
        time.sleep(0.1)
    assert i.live_requests == 0 and i.kv_free_bytes == i.kv_total_bytes


def test_children_die_with_a_killed_launcher(mixed_cluster) -> None:
    # SIGKILL gives `tandem up` no chance to clean up: PR_SET_PDEATHSIG must still end its children.
    kids = mixed_cluster.children()
    assert len(kids) == 2
    mixed_cluster.stop(signal.SIGKILL)
    deadline = time.monotonic() + 20
    while any(alive(p) for p in kids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [p for p in kids if alive(p)]
