"""Admission control, routing spread and drain over real processes: 1 prefill + 2 decode workers (max_batch 4,
max_waiting 4 each, so the cluster holds 16 requests) and a gateway whose bound is derived from that.

16 concurrent requests after an idle gap spread over both decode workers; 4x the capacity at once gets 429 with
Retry-After for the excess (never a 5xx) while the accepted ones complete; SIGTERM of the gateway lets its
streams finish while new requests get 503, then it exits.
"""

from __future__ import annotations

import asyncio
import json
import signal
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest
from kit.faults import Split, StreamResult, run_streams, start_split, stop_split, stream, wait_until

pytestmark = pytest.mark.slow
CAPACITY = 16  # 2 decode workers x (max_batch 4 + max_waiting 4)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from kit.checkpoints import tiny_config, write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", tiny_config(max_seq_len=4096))


@pytest.fixture(scope="module")
def split(tiny: Path, tmp_path_factory: pytest.TempPathFactory):
    s = start_split(tmp_path_factory.mktemp("overload"), str(tiny), 1, 2,
                    decode_batching={"max_batch": 4, "max_waiting": 4}, gateway={"drain_s": 60})
    yield s
    stop_split(s)


def test_the_gateway_bound_is_what_the_pools_hold(split: Split) -> None:
    assert f'"max_inflight": {CAPACITY}' in split.log("gateway")


def test_refused_and_rejected_requests_give_their_place_back(split: Split) -> None:
    url = f"{split.http}/v1/completions"
    for _ in range(CAPACITY + 2):  # more than the bound: a leaked place would turn the last ones into 429s
        assert httpx.post(url, content=b"{not json").status_code == 400
        assert httpx.post(url, json={"model": "tiny", "prompt": [1], "max_tokens": 0}).status_code == 400
    assert httpx.post(url, json={"model": "tiny", "prompt": [1, 2], "max_tokens": 2}).status_code == 200
    metrics = httpx.get(f"{split.http}/metrics").text
    assert "tandem_gateway_inflight 0.0" in metrics


def test_concurrent_requests_after_an_idle_gap_spread_over_both_decode_workers(split: Split) -> None:
    time.sleep(1.0)  # idle: every poll the router holds says both workers are empty
    results = run_streams(split.grpc, [[5 + i, 7, 9] for i in range(16)], 24)
    assert all(r.error is None for r in results), [r.error for r in results if r.error]
    per_worker = Counter(r.workers[-1][1] for r in results)
    print(f"\n16 concurrent requests after idle: {dict(per_worker)}")
    assert len(per_worker) == 2 and max(per_worker.values()) <= 10


def _check(replies: list, max_tokens: int) -> Counter:
    """Every answer is 200 or 429; each 429 carries Retry-After and the OpenAI error; each 200 has every token."""
    codes = Counter(r.status for r in replies)
    assert set(codes) <= {200, 429}, codes
    for r in replies:
        if r.status == 429:
            assert int(r.retry_after) >= 1
            assert json.loads(r.body)["error"]["type"] == "rate_limit_error"
        else:
            doc = json.loads(r.body)
            assert doc["usage"]["completion_tokens"] == max_tokens and doc["choices"][0]["finish_reason"] == "length"
    return codes


def test_four_times_the_capacity_gets_429_for_the_excess_and_no_5xx(split: Split) -> None:
    """One burst (every request written before any answer is read; see `tandem bench overload` for why the
    client matters), against an idle cluster: the capacity is taken, the rest refused, the accepted complete."""
    from services.bench.overload import burst, completion

    n = 4 * CAPACITY
    _, replies = asyncio.run(burst("raw", split.http, [completion(i, 200, "tiny") for i in range(n)]))
    codes = _check(replies, 200)
    print(f"\n{n} concurrent requests, capacity {CAPACITY}: {dict(codes)}")
    assert codes[200] >= CAPACITY and codes[429] > 0


def test_a_burst_while_every_place_is_taken_is_refused_whole(split: Split) -> None:
    """CAPACITY long requests hold every place; 3x CAPACITY more at once all get 429; the holders complete."""
    from services.bench.overload import RawBurst, RawConnections, completion

    async def run() -> tuple[list, list]:
        host, port = split.http.removeprefix("http://").rsplit(":", 1)
        hold = await RawConnections(host, int(port)).open(CAPACITY)
        extra = RawBurst(split.http)
        await extra.prepare(3 * CAPACITY)
        sent = hold.send([completion(100 + i, 600, "tiny") for i in range(CAPACITY)])
        try:
            full = f"tandem_gateway_inflight {float(CAPACITY)}"
            while full not in (await asyncio.to_thread(httpx.get, f"{split.http}/metrics")).text:
                await asyncio.sleep(0.01)
            refused = await extra.fire([completion(i, 200, "tiny") for i in range(3 * CAPACITY)])
            return refused, await hold.replies(sent)
        finally:
            hold.close()

    refused, held = asyncio.run(run())
    assert _check(refused, 200) == Counter({429: 3 * CAPACITY})
    assert _check(held, 600) == Counter({200: CAPACITY})


def test_a_full_gateway_answers_grpc_with_resource_exhausted(split: Split) -> None:
    import grpc

    from services.rpc.tandem.v1 import generation_pb2 as gpb
    from services.rpc.tandem.v1 import generation_pb2_grpc as gpb_grpc

    def request(i: int, max_tokens: int) -> gpb.GenerateRequest:
        req = gpb.GenerateRequest(token_ids=gpb.TokenIds(ids=[4, 5, 6 + i]))
        req.sampling.max_tokens, req.sampling.ignore_eos = max_tokens, True
        return req

    with grpc.insecure_channel(split.grpc) as ch:
        stub = gpb_grpc.GenerationStub(ch)
        held = [stub.Generate(request(i, 3000), timeout=120) for i in range(CAPACITY)]  # long: they hold places
        try:
            for call in held:
                next(call)  # admitted and streaming
            with pytest.raises(grpc.RpcError) as exc:
                list(stub.Generate(request(99, 4), timeout=10))
            assert exc.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert dict(exc.value.trailing_metadata() or ())["retry-after"] == "1"
        finally:
            for call in held:
                call.cancel()
    # the cancelled streams give their places back
    wait_until(lambda: "tandem_gateway_inflight 0.0" in httpx.get(f"{split.http}/metrics").text, 30,
               "the cancelled streams to leave")


def test_sigterm_drains_the_gateway(split: Split) -> None:
    """In-flight streams finish; new requests get 503 with the OpenAI error JSON; then the gateway exits 0."""
    results = [StreamResult() for _ in range(6)]
    flowing = [threading.Event() for _ in results]
    threads = [threading.Thread(target=stream, args=(split.grpc, [9, 8, 7 + i], 600, results, i, flowing[i]))
               for i in range(len(results))]
    for t in threads:
        t.start()
    for f in flowing:
        assert f.wait(60)
    split.signal("gateway", signal.SIGTERM)
    wait_until(lambda: httpx.get(f"{split.http}/health").status_code == 503, 10, "/health to say draining")
    r = httpx.post(f"{split.http}/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 4})
    assert r.status_code == 503 and "draining" in r.json()["error"]["message"]
    for t in threads:
        t.join(120)
    assert all(r.error is None and len(r.token_ids) == 600 and r.finish for r in results), \
        [r.error for r in results]
    assert split.cluster.procs["gateway"].wait(30) == 0
