"""Request migration over real processes: 2 prefill + 3 decode workers and a gateway, on a tiny checkpoint.

A corrupted KV chunk is caught by its crc32 and the request retried on another pair; a SIGSTOPped decode worker's
streams move after the gateway's stall timeout and the worker serves again after SIGCONT; SIGTERM drains a decode
worker (its streams finish there); SIGKILL of a decode worker under 18 live greedy streams loses none of them;
a SIGSTOPped prefill worker's prompts move to the other one after the stall timeout (every prefill worker
stopped: a clear UNAVAILABLE, not a hang); with no prefill worker left, a clear UNAVAILABLE. Every output is the
greedy one (checked teacher-forced).
"""

from __future__ import annotations

import signal
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from kit.faults import (
    Split,
    StreamResult,
    greedy_mismatch,
    run_streams,
    start_split,
    stop_split,
    stream,
    wait_until,
)

from services.bench.faultproxy import CorruptingProxy

pytestmark = pytest.mark.slow
STALL_S = 3.0
MAX_TOKENS = 1000
LONG = 3000  # streams a stopped or killed worker cannot have finished when it stops (see AHEAD)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from kit.checkpoints import tiny_config, write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", tiny_config(max_seq_len=4096))


@pytest.fixture(scope="module")
def engine(tiny: Path):
    from services.engine.loader import load_engine

    return load_engine(str(tiny), device="cpu")


@pytest.fixture(scope="module")
def proxy() -> dict:
    return {}


@pytest.fixture(scope="module")
def split(tiny: Path, tmp_path_factory: pytest.TempPathFactory, proxy: dict):
    def via(name: str, address: str) -> str | None:
        if name == "decode-0":  # the gateway (and so every KV push) reaches decode-0 through the proxy
            proxy["p"] = CorruptingProxy(address)
            return proxy["p"].address
        return None

    s = start_split(tmp_path_factory.mktemp("migration"), str(tiny), 2, 3, via=via,
                    gateway={"stall_s": STALL_S, "drain_s": 5})
    yield s
    stop_split(s)
    proxy["p"].close()


def prompts(n: int, length: int = 24, seed: int = 0) -> list[list[int]]:
    import random

    rng = random.Random(seed)
    return [[rng.randrange(3, 384) for _ in range(length)] for _ in range(n)]


def reference(engine, prompt: list[int], max_tokens: int) -> list[int]:
    from services.engine.generate import generate
    from services.engine.sampling import SamplingParams

    return list(generate(engine, prompt, SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)))


def decode_of(result) -> str:
    return result.workers[-1][1]


# A worker runs ahead of what a client has read (tokens wait in the worker's, the gateway's and the client's
# gRPC buffers): measured here up to 3.3x the count read (a stream read to 271 tokens had been made to 894 when its
# worker was stopped). A stream counts as live on its worker only while 4x its count read is below its length.
AHEAD = 4


def held(results: list, addr: str, max_tokens: int) -> list[int]:
    """Streams of decode worker `addr` that it cannot have finished yet (see AHEAD)."""
    return [i for i, r in enumerate(results)
            if decode_of(r) == addr and not r.finish and AHEAD * len(r.token_ids) < max_tokens]


def busiest(results: list, max_tokens: int) -> tuple[str, list[int]]:
    """The decode worker holding the most streams it cannot have finished yet, and those streams."""
    counts = Counter(decode_of(r) for r in results)
    addr = max(counts, key=lambda a: len(held(results, a, max_tokens)))
    return addr, held(results, addr, max_tokens)


def check_greedy(engine, prompts: list[list[int]], results: list, max_tokens: int = MAX_TOKENS) -> None:
    """Every stream completed, max_tokens long, each token the greedy choice after everything before it
    (what a fault-free greedy run produces)."""
    for p, r in zip(prompts, results, strict=True):
        assert r.error is None, r.error
        assert len(r.token_ids) == max_tokens and r.finish
        assert greedy_mismatch(engine, p, r.token_ids) == -1, f"stream {r.workers} differs from greedy"


def test_a_corrupted_kv_chunk_is_detected_and_retried(split: Split, proxy: dict, engine) -> None:
    prompt = prompts(1, length=1500, seed=1)[0]  # 1500 tokens: each K/V tensor is one 192 KB piece
    proxy["p"].arm(1)
    results = run_streams(split.grpc, [prompt], 8)
    r = results[0]
    assert r.error is None, r.error
    assert proxy["p"].corrupted == 1
    assert r.token_ids == reference(engine, prompt, 8)
    wrong = r.token_ids[:4] + [(r.token_ids[4] + 1) % 384] + r.token_ids[5:]
    assert greedy_mismatch(engine, prompt, r.token_ids) == -1 and greedy_mismatch(engine, prompt, wrong) == 4
    assert r.workers[-1][1] != split.addr["decode-0"] and len(r.workers) == 1  # no token came from the bad push
    assert "checksum mismatch" in split.log("decode-0")
    assert "moving request to another pair" in split.log("gateway")


def test_a_stopped_decode_worker_loses_its_streams_to_the_others_and_rejoins(split: Split, engine) -> None:
    ps = prompts(9, seed=2)
    victim: dict = {}

    def stop_one(results: list) -> None:
        wait_until(lambda: all(len(r.token_ids) >= 20 for r in results), 60, "every stream to flow")
        victim["addr"], victim["held"] = busiest(results, LONG)
        victim["name"] = split.name_of(victim["addr"])
        split.signal(victim["name"], signal.SIGSTOP)
        print(f"\nSIGSTOP {victim['name']} holding live streams {victim['held']}; tokens read so far "
              f"{[len(r.token_ids) for r in results]}")

    try:
        results = run_streams(split.grpc, ps, LONG, during=stop_one)
    finally:
        if "name" in victim:
            split.signal(victim["name"], signal.SIGCONT)
    assert victim["held"], "no live stream was on the stopped worker"
    check_greedy(engine, ps, results, LONG)
    for i in victim["held"]:  # each moved, and ended on another worker
        r = results[i]
        assert r.workers[0][1] == victim["addr"] and decode_of(r) != victim["addr"], r.workers
    # after SIGCONT (and the gateway's hold on it, STALL_S) it takes new work again
    time.sleep(STALL_S + 0.5)
    later = run_streams(split.grpc, prompts(6, seed=3), 40)
    assert all(r.error is None for r in later)
    assert victim["addr"] in {decode_of(r) for r in later}


def test_sigterm_drains_a_decode_worker(split: Split, engine) -> None:
    """Its live streams finish where they are; then it exits 0, and new requests go to the others."""
    ps = prompts(6, seed=6)
    victim: dict[str, str] = {}

    def term_one(results: list) -> None:
        wait_until(lambda: all(len(r.token_ids) >= 20 for r in results), 60, "every stream to flow")
        victim["addr"], _ = busiest(results, MAX_TOKENS)
        victim["name"] = split.name_of(victim["addr"])
        split.signal(victim["name"], signal.SIGTERM)

    results = run_streams(split.grpc, ps, MAX_TOKENS, during=term_one)
    check_greedy(engine, ps, results)
    stayed = [r for r in results if r.workers[0][1] == victim["addr"]]
    assert stayed and all(len(r.workers) == 1 for r in stayed)  # finished on the draining worker, not moved
    assert split.cluster.procs[victim["name"]].wait(30) == 0
    assert "worker draining" in split.log(victim["name"])
    after = run_streams(split.grpc, prompts(4, seed=7), 16)
    assert all(r.error is None for r in after) and victim["addr"] not in {decode_of(r) for r in after}


def test_sigkill_of_a_decode_worker_under_18_streams_loses_no_request(split: Split, engine) -> None:
    ps = prompts(18, seed=4)
    victim: dict = {}

    def kill_one(results: list) -> None:
        wait_until(lambda: all(len(r.token_ids) >= 20 for r in results), 60, "every stream to flow")
        victim["addr"], victim["held"] = busiest(results, LONG)
        victim["name"] = split.name_of(victim["addr"])
        victim["live"] = sum(not r.finish for r in results)
        split.signal(victim["name"], signal.SIGKILL)

    t0 = time.monotonic()
    results = run_streams(split.grpc, ps, LONG, during=kill_one)
    moved = [r for r in results if len(r.workers) > 1]
    print(f"\nSIGKILL {victim['name']} holding live streams {victim['held']} of {victim['live']}: "
          f"{len(moved)} moved, {sum(r.error is None for r in results)}/18 completed in {time.monotonic() - t0:.1f}s")
    assert victim["live"] >= 16 and victim["held"]
    check_greedy(engine, ps, results, LONG)
    for i in victim["held"]:
        assert decode_of(results[i]) != victim["addr"], results[i].workers
    # the others never stopped: new requests are served by what is left
    after = run_streams(split.grpc, prompts(4, seed=5), 16)
    assert all(r.error is None and len(r.token_ids) == 16 for r in after)
    assert victim["addr"] not in {decode_of(r) for r in after}


def stalled_prefills(split: Split) -> int:
    return split.log("gateway").count('"moving request to another pair: prefill worker ')


def test_a_stopped_prefill_worker_loses_its_prompts_to_the_other_and_rejoins(split: Split, engine) -> None:
    """SIGSTOP prefill-0, then 6 requests at once: the first ones are routed to it before its heartbeat lapses
    (the embedded registry needs a failed 1 s poll to drop it); their prompt calls get no answer, the gateway gives
    up after STALL_S without a heartbeat and re-runs them on prefill-1: every request completes, greedy."""
    victim = split.addr["prefill-0"]
    ps = prompts(6, length=300, seed=8)
    before = stalled_prefills(split)
    # both prefill workers in the gateway's view (a pair of requests spreads over them) right before the stop
    wait_until(lambda: {r.workers[-1][0] for r in run_streams(split.grpc, prompts(2, seed=12), 2)} ==
               {victim, split.addr["prefill-1"]}, 30, "both prefill workers to take prompts")
    split.signal("prefill-0", signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        results = [StreamResult() for _ in ps]
        threads = [threading.Thread(target=stream, args=(split.grpc, p, 64, results, i), kwargs={"timeout": 60})
                   for i, p in enumerate(ps)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(90)
        took = time.monotonic() - t0
    finally:
        split.signal("prefill-0", signal.SIGCONT)
    moved = stalled_prefills(split) - before
    print(f"\nSIGSTOP prefill-0: {moved} prompt(s) moved to prefill-1 after the stall timeout; "
          f"all {len(ps)} done in {took:.1f}s")
    for p, r in zip(ps, results, strict=True):
        assert r.error is None, r.error
        assert len(r.token_ids) == 64 and r.finish
        assert greedy_mismatch(engine, p, r.token_ids) == -1
        assert r.workers[-1][0] != victim
    assert moved >= 1, "no request was routed to the stopped prefill worker"
    assert f"prefill worker {victim} stalled: no heartbeat for {STALL_S:g}s" in split.log("gateway")
    # after SIGCONT (and the gateway's hold on it, STALL_S) it takes prompts again
    time.sleep(STALL_S + 0.5)
    later = run_streams(split.grpc, prompts(6, seed=9), 8)
    assert all(r.error is None for r in later)
    assert victim in {r.workers[-1][0] for r in later}


def test_every_prefill_worker_stopped_is_a_clear_unavailable_not_a_hang(split: Split) -> None:
    """Both prefill workers SIGSTOPped: the request ends in UNAVAILABLE naming the stall within a few STALL_S,
    not at its deadline; after SIGCONT they serve again."""
    import grpc

    names = [n for n in split.addr if n.startswith("prefill")]
    for n in names:
        split.signal(n, signal.SIGSTOP)
    try:
        results = [StreamResult()]
        t0 = time.monotonic()
        stream(split.grpc, prompts(1, seed=10)[0], 8, results, 0, timeout=60)
        took = time.monotonic() - t0
    finally:
        for n in names:
            split.signal(n, signal.SIGCONT)
    print(f"\nevery prefill worker stopped: {results[0].code} after {took:.1f}s: {results[0].error}")
    assert results[0].code == grpc.StatusCode.UNAVAILABLE, results[0]
    assert "stalled: no heartbeat" in (results[0].error or "")
    time.sleep(STALL_S + 0.5)
    wait_until(lambda: run_streams(split.grpc, prompts(1, seed=11), 4)[0].error is None, 30,
               "the prefill workers to serve again")


def test_no_pair_left_is_a_clear_unavailable(split: Split) -> None:
    """With every prefill worker stopped, a request ends in UNAVAILABLE naming the problem (not a hang)."""
    import grpc

    names = [n for n in split.addr if n.startswith("prefill")]
    for n in names:
        split.signal(n, signal.SIGKILL)
    wait_until(lambda: all(split.cluster.procs[n].poll() is not None for n in names), 10, "prefill workers to die")
    results = [StreamResult()]
    t = threading.Thread(target=stream, args=(split.grpc, prompts(1)[0], 8, results, 0), daemon=True)
    t.start()
    t.join(30)
    assert results[0].code == grpc.StatusCode.UNAVAILABLE, results[0]
    assert "prefill" in (results[0].error or "")
