"""The registry against a real Redis of our own: register, heartbeat with load, TTL expiry, deregister,
re-register after Redis restarts empty, and the router's view staying put while Redis is paused or down."""

from __future__ import annotations

import time

import pytest
from kit.net import free_port
from kit.redisd import RedisServer

from services.contracts.errors import Unavailable
from services.contracts.layout import parse_layout
from services.contracts.registry_url import parse_registry
from services.registry.live import Heartbeat, MemoryRegistry, WorkerRecord
from services.registry.redis_store import RedisRegistry
from services.router import JSQRouter

TTL = 0.8


@pytest.fixture
def server(tmp_path):
    srv = RedisServer(free_port(), tmp_path).start()
    yield srv
    srv.stop()


def rec(address: str, role: str = "decode", live: int = 0, index: int = 0) -> WorkerRecord:
    return WorkerRecord(role, address, index, "tiny", "fp", 8, 256, 1000, 0, live, 0, 1000 - live)


def wait_until(pred, timeout: float = 5.0) -> float:
    t0 = time.monotonic()
    while not pred():
        assert time.monotonic() - t0 < timeout, "condition not met in time"
        time.sleep(0.02)
    return time.monotonic() - t0


def test_register_heartbeat_expiry_and_deregister(server: RedisServer) -> None:
    url = f"{server.url}?ttl_s={TTL}"
    worker, view = RedisRegistry(url), RedisRegistry(url, refresh_s=0.05).watch()
    try:
        worker.heartbeat(rec("d0:1", live=3))
        worker.heartbeat(rec("p0:1", role="prefill"))
        worker.heartbeat(rec("p1:1", role="prefill", index=1))
        wait_until(lambda: len(view.all()) == 3)
        assert [e.address for e in view.endpoints("decode")] == ["d0:1"]
        assert view.info("d0:1").live_requests == 3 and view.info("d0:1").fingerprint == "fp"
        worker.heartbeat(rec("d0:1", live=5))  # a heartbeat carries the live load
        wait_until(lambda: view.info("d0:1").live_requests == 5)
        for r in (rec("d0:1"), rec("p1:1", role="prefill", index=1)):  # p0 stops beating: gone within one TTL
            worker.heartbeat(r)
        lapsed = wait_until(lambda: [e.address for e in view.endpoints("prefill")] == ["p1:1"])
        assert lapsed <= TTL + 0.1, lapsed
        # its last sign of life stays known (the gateway's prefill stall watch reads it) and grows old
        assert time.monotonic() - view.last_beat("p0:1") >= TTL - 0.05 > time.monotonic() - view.last_beat("p1:1")
        assert view.last_beat("nobody:1") is None
        with pytest.raises(Unavailable):
            view.info("p0:1")
        # every prefill worker lapsed at once (late heartbeats, not dead workers): the last known ones stay
        time.sleep(TTL + 0.1)
        assert {e.address for e in view.endpoints("prefill")} == {"p0:1", "p1:1"}
        worker.deregister("d0:1")  # drain: gone at the next refresh, not a TTL later
        assert wait_until(lambda: not view.endpoints("decode")) < 0.3
        worker.heartbeat(rec("d0:1"))  # re-register
        wait_until(lambda: len(view.endpoints("decode")) == 1)
    finally:
        view.close()
        worker.close()


def test_view_survives_pause_and_restart_and_workers_re_register(server: RedisServer) -> None:
    url = f"{server.url}?ttl_s={TTL}"
    view = RedisRegistry(url, refresh_s=0.05).watch()
    beats = [Heartbeat(RedisRegistry(url), lambda a=a, i=i: rec(a, index=i)).start()
             for i, a in enumerate(["d0:1", "d1:1"])]
    try:
        wait_until(lambda: len(view.all()) == 2)
        server.pause(3 * TTL)  # longer than a TTL: nothing may lapse from the view meanwhile
        wait_until(lambda: not view.reachable)
        t_end = time.monotonic() + 2.5 * TTL
        while time.monotonic() < t_end:
            assert len(view.endpoints("decode")) == 2
            assert time.monotonic() - view.last_beat("d0:1") < TTL  # no news from a lost Redis is not silence
            time.sleep(0.05)
        wait_until(lambda: view.reachable, timeout=5)
        assert len(view.endpoints("decode")) == 2
        server.kill()  # killed: the view is frozen again
        wait_until(lambda: not view.reachable)
        time.sleep(2 * TTL)
        assert len(view.endpoints("decode")) == 2
        server.start()  # restarted empty: the workers' heartbeats re-register them
        wait_until(lambda: view.reachable, timeout=5)
        wait_until(lambda: len(server.client().keys("tandem:worker:*")) == 2, timeout=5)
        time.sleep(2 * TTL)
        assert len(view.endpoints("decode")) == 2
        assert all(b.beats >= 2 for b in beats)
    finally:
        for b in beats:
            b.stop()
        view.close()


def test_router_stops_picking_a_lapsed_worker_within_one_ttl(server: RedisServer) -> None:
    url = f"{server.url}?ttl_s={TTL}"
    view = RedisRegistry(url, refresh_s=0.05).watch()
    beats = {a: Heartbeat(RedisRegistry(url), lambda a=a, r=r, i=i: rec(a, role=r, index=i)).start()
             for a, r, i in [("p0:1", "prefill", 0), ("d0:1", "decode", 0), ("d1:1", "decode", 1)]}
    router = JSQRouter(view, view.info, ttl_s=0.0)
    try:
        wait_until(lambda: len(view.all()) == 3)
        assert {router.pick(4).decode for _ in range(4)} == {"d0:1", "d1:1"}
        beats["d1:1"]._stop.set()  # d1 stops beating (a hung worker), without deregistering
        stopped = time.monotonic()
        while "d1:1" in {router.pick(4).decode for _ in range(4)}:
            time.sleep(0.01)
        assert time.monotonic() - stopped <= TTL + 0.1
        assert {router.pick(4).decode for _ in range(8)} == {"d0:1"}
    finally:
        for b in beats.values():
            b.stop()
        view.close()


def test_memory_registry_expires_and_deregisters() -> None:
    reg = MemoryRegistry(ttl_s=0.3)
    reg.heartbeat(rec("d0:1"))
    reg.heartbeat(rec("d1:1", index=1))
    assert [e.address for e in reg.endpoints("decode")] == ["d0:1", "d1:1"]
    time.sleep(0.2)
    reg.heartbeat(rec("d1:1", index=1))
    time.sleep(0.15)
    assert [e.address for e in reg.all()] == ["d1:1"]
    reg.deregister("d1:1")
    assert [e.address for e in reg.all()] == ["d0:1"]  # the only one left, though lapsed (see live())
    reg.deregister("d0:1")
    assert reg.all() == []
    beat = reg.last_beat("d0:1")  # kept after it dropped out: when it was last heard from
    assert beat is not None and time.monotonic() - beat >= 0.3
    reg.seen("d0:1")  # it answered, though refusing (draining): alive
    assert time.monotonic() - reg.last_beat("d0:1") < 0.1 and reg.all() == []


@pytest.mark.parametrize("value, needle", [
    ("banana", "expected 'memory' or redis://"), ("redis://h:xx/0", "bad port"), ("redis://h/x", "database"),
    ("redis://h/0?ttl_s=-1", "ttl_s"), ("redis://h/0?pool=3", "unknown option"), ("http://h:6379/0", "redis://"),
])
def test_junk_registry_is_an_error_naming_registry(value: str, needle: str) -> None:
    from services.contracts.errors import InvalidArgument

    with pytest.raises(InvalidArgument) as exc:
        parse_layout({"registry": value})
    assert exc.value.param == "registry" and needle in exc.value.message


def test_redis_url_parses() -> None:
    spec = parse_registry("redis://10.0.0.5:6380/2?ttl_s=1.5")
    assert (spec.kind, spec.host, spec.port, spec.db, spec.ttl_s, spec.url) == (
        "redis", "10.0.0.5", 6380, 2, 1.5, "redis://10.0.0.5:6380/2")
    assert parse_layout({"registry": "redis://redis:6379/0"}).registry == "redis://redis:6379/0"
