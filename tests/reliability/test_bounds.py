"""The bounds behind admission control, in process: the gateway's door, the workers' queues, the KV budget,
concurrent router picks, the capacity a layout implies, and the KV push limit that starts when the KV is ready."""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass

import pytest

from services.contracts.errors import ResourceExhausted, Unavailable
from services.contracts.layout import Batching, Layout, Pool
from services.gateway.admission import Admission, Watchdog
from services.kv.sender import push_timeout
from services.kv.store import KVStore
from services.registry import Endpoint, StaticRegistry
from services.router import JSQRouter


def test_the_door_refuses_at_once_when_full_and_while_draining() -> None:
    door = Admission(2)
    a, b = door.enter(), door.enter()
    t0 = time.perf_counter()
    with pytest.raises(ResourceExhausted) as exc:
        door.enter()
    assert time.perf_counter() - t0 < 0.01 and exc.value.retry_after_s >= 1
    t0 = time.perf_counter()
    for _ in range(1000):
        with pytest.raises(ResourceExhausted):
            door.enter()
    print(f"\na refusal at the door, in process: {(time.perf_counter() - t0) * 1e3:.3f} us")
    a.release()
    a.release()  # idempotent
    c = door.enter()
    threading.Timer(0.2, b.release).start()
    threading.Timer(0.3, c.release).start()
    assert door.drain(5.0) and door.inflight == 0
    with pytest.raises(Unavailable, match="draining"):
        door.enter()


def test_the_watchdog_fires_once_for_a_silent_stream_only() -> None:
    dog = Watchdog(0.2)
    fired: list[str] = []
    quiet = dog.watch(lambda: fired.append("quiet"))
    busy = dog.watch(lambda: fired.append("busy"))
    for _ in range(10):
        busy.kick()
        time.sleep(0.05)
    dog.unwatch(busy)
    assert fired == ["quiet"] and quiet.fired and not busy.fired


def test_a_call_without_tokens_is_judged_by_its_workers_heartbeat() -> None:
    """A prefill call: it fires when the worker's last heartbeat (or the call's start, if later) is older than
    stall_s; a beating worker's long call never fires; no heartbeat source (None) never fires; a cancel bound
    after the verdict runs at once."""
    dog = Watchdog(0.2)
    beats = {"alive": time.monotonic(), "stopped": time.monotonic()}
    cancelled: list[str] = []
    stopped = dog.watch(beat=lambda: beats["stopped"])
    alive = dog.watch(beat=lambda: beats["alive"])
    unknown = dog.watch(beat=lambda: None)
    stopped.bind(lambda: cancelled.append("stopped"))
    for _ in range(10):
        beats["alive"] = time.monotonic()
        time.sleep(0.05)
    assert cancelled == ["stopped"] and stopped.fired and not alive.fired and not unknown.fired
    stopped.bind(lambda: cancelled.append("late"))  # the call began after the verdict: cancelled on arrival
    assert cancelled == ["stopped", "late"]
    for w in (alive, unknown):
        dog.unwatch(w)
    beats["alive"] = 0.0  # long silent now, but unwatched (its call ended): never fires
    time.sleep(0.5)
    assert not alive.fired and cancelled == ["stopped", "late"]


def test_the_kv_store_bounds_requests_held_and_counts_the_schedulers_share() -> None:
    held = {"n": 0}
    store = KVStore(budget_bytes=1000, other_used=lambda: 600, max_held=3, other_held=lambda: held["n"])
    try:
        t1 = store.begin("a", 100, cancel=lambda: None)
        store.begin("b", 100, cancel=lambda: None)
        assert store.free_bytes == 1000 - 600 - 200
        with pytest.raises(ResourceExhausted, match="does not fit"):
            store.begin("c", 300, cancel=lambda: None)  # 600 (scheduler: live + claimed, not admitted) + 200 + 300
        held["n"] = 1  # the scheduler holds one more request: three in all
        with pytest.raises(ResourceExhausted, match="requests held"):
            store.begin("d", 10, cancel=lambda: None)
        store.abort(t1)
        store.draining = True
        with pytest.raises(Unavailable, match="draining"):
            store.begin("e", 10, cancel=lambda: None)
    finally:
        store.close()


def test_claimed_but_not_admitted_kv_counts_against_the_budget() -> None:
    """A request the scheduler holds in its waiting queue keeps its reservation out of kv_free_bytes."""
    from kit.checkpoints import tiny_config

    from services.batching.scheduler import DecodeRequest, FusionScheduler
    from services.engine import Engine
    from services.engine.model import Transformer
    from services.engine.sampling import SamplingParams

    cfg = tiny_config()
    engine = Engine(Transformer(cfg), name="tiny")
    sched = FusionScheduler(engine, max_batch=1)  # not started: submitted requests wait
    kv = engine.new_kv(1, 10)
    layers = [(kv.k[i, 0, :10].clone(), kv.v[i, 0, :10].clone()) for i in range(cfg.n_layers)]
    sched.submit(DecodeRequest("r", layers, 5, SamplingParams(max_tokens=6), emit=lambda *_: None))
    st = sched.stats()
    assert st["waiting"] == 1 and st["kv_used_bytes"] == 0
    assert st["kv_waiting_bytes"] == 15 * sched.batch.bytes_per_token  # prompt 10 + max_tokens 6 - 1
    sched.cancel("r")
    sched.step()
    assert sched.stats()["kv_waiting_bytes"] == 0


def test_the_prefill_queue_is_bounded() -> None:
    from kit.checkpoints import tiny_config

    from services.engine import Engine
    from services.engine.model import Transformer
    from services.engine.sampling import SamplingParams
    from services.workers.prefill import PrefillBatcher, PrefillJob

    cfg = tiny_config()
    engine = Engine(Transformer(cfg), name="tiny")
    batcher = PrefillBatcher(engine, max_batch=1, max_waiting=1)
    jobs = [PrefillJob(f"j{i}", [3, 4, 5], SamplingParams(max_tokens=1), None) for i in range(3)]
    try:
        with batcher._cv:  # the batcher's loop cannot take a job while we hold its lock (re-entrant)
            batcher.submit(jobs[0])
            batcher.submit(jobs[1])
            with pytest.raises(ResourceExhausted, match="prefill worker full"):
                batcher.submit(jobs[2])
        for j in jobs[:2]:
            j.future.result(10)
        assert batcher.drain(5.0)
        with pytest.raises(Unavailable):
            batcher.submit(PrefillJob("late", [3], SamplingParams(max_tokens=1), None))
    finally:
        batcher.stop()


@dataclass
class _Info:
    pending_prompt_tokens: int = 0
    live_requests: int = 0
    waiting_requests: int = 0
    kv_free_bytes: int = 1 << 30
    kv_total_bytes: int = 1 << 30


def test_concurrent_picks_after_an_idle_gap_spread() -> None:
    """Every pick sees the same stale poll (idle workers); the reservation under the lock still spreads them."""
    reg = StaticRegistry([Endpoint("prefill", 0, "p0:1"), Endpoint("decode", 0, "d0:1"), Endpoint("decode", 1, "d1:1")])

    def slow_info(addr: str) -> _Info:
        time.sleep(0.05)  # polls overlap: every concurrent pick starts from "both empty"
        return _Info()

    router = JSQRouter(reg, slow_info, ttl_s=10.0)
    go = threading.Barrier(16)
    routes = []

    def pick() -> None:
        go.wait()
        routes.append(router.pick(10))

    threads = [threading.Thread(target=pick) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert Counter(r.decode for r in routes) == {"d0:1": 8, "d1:1": 8}
    for r in routes:
        router.finished(r)
    assert not any(router.board.sent_requests.values())
    with pytest.raises(Unavailable, match="avoiding"):
        router.pick(1, exclude=frozenset({"d0:1", "d1:1"}))


def test_the_gateway_bound_defaults_to_what_the_pools_hold() -> None:
    small = Batching(max_batch=4, max_waiting=4)
    lay = Layout(pools=[Pool(role="prefill", count=1), Pool(role="decode", count=2, batching=small)])
    assert lay.capacity() == 16  # decode: 2 x (4 + 4); prefill: 32 + 64
    assert Layout().capacity() == 32 + 64  # one mixed worker, the default batching
    assert Batching(max_batch=8).waiting_bound() == 16


def test_the_kv_push_limit_scales_with_the_prompt() -> None:
    assert push_timeout(0) == 30.0
    assert push_timeout(8100) > push_timeout(1000) > 30.0


def test_the_http_door_answers_a_burst_of_a_full_gateway_at_once() -> None:
    """64 concurrent requests (100 kB prompts) to a full gateway over real HTTP (uvicorn), all written before any
    answer is read: every one is 429 with Retry-After, none read its body or reached a handler."""
    import asyncio

    import uvicorn
    from kit.net import free_port

    from services.bench.overload import burst
    from services.gateway.core import Gateway
    from services.gateway.http import create_app

    gw = Gateway(None, StaticRegistry([]), "tiny", max_inflight=1)
    held = gw.admit()  # the one place is taken: the gateway is full
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(gw), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    body = b'{"model": "tiny", "prompt": "' + b"x" * 100_000 + b'", "max_tokens": 4}'
    try:
        _, out = asyncio.run(burst("raw", f"http://127.0.0.1:{port}", [body] * 64))
    finally:
        server.should_exit = True
        thread.join(10)
        held.release()
    assert all(r.status == 429 and r.retry_after == "1" for r in out)
    assert gw.admission.refused == 64
    metrics = gw.metrics.render().decode()
    assert 'tandem_gateway_refused_total{reason="full"} 64.0' in metrics
    assert 'tandem_gateway_refusal_seconds_count{reason="full"} 64.0' in metrics  # what `tandem bench overload` reads
