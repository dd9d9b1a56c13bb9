"""Router policy: JSQ by pending prompt tokens (prefill) and by batch load / free KV (decode), mixed fallback."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from services.contracts.errors import InvalidArgument, Unavailable
from services.contracts.layout import Layout, Pool, parse_layout
from services.registry import Endpoint, StaticRegistry, layout_endpoints
from services.router import JSQRouter, RoundRobinRouter, make_router


@dataclass
class Info:  # the fields of WorkerInfo the router reads
    pending_prompt_tokens: int = 0
    live_requests: int = 0
    waiting_requests: int = 0
    kv_free_bytes: int = 1000
    kv_total_bytes: int = 1000


def split_registry() -> StaticRegistry:
    return StaticRegistry([Endpoint("prefill", 0, "p0:1"), Endpoint("prefill", 1, "p1:1"),
                           Endpoint("decode", 0, "d0:1"), Endpoint("decode", 1, "d1:1")])


def test_jsq_picks_least_pending_prefill_and_lightest_decode() -> None:
    loads = {"p0:1": Info(pending_prompt_tokens=500), "p1:1": Info(pending_prompt_tokens=10),
             "d0:1": Info(live_requests=3), "d1:1": Info(live_requests=1)}
    r = JSQRouter(split_registry(), loads.__getitem__, ttl_s=60)
    route = r.pick(100)
    assert (route.prefill, route.decode, route.mixed) == ("p1:1", "d1:1", False)


def test_jsq_counts_its_own_inflight_work_between_polls() -> None:
    loads = {a: Info() for a in ("p0:1", "p1:1", "d0:1", "d1:1")}
    r = JSQRouter(split_registry(), loads.__getitem__, ttl_s=60)  # never re-polls: only local accounting moves
    a, b = r.pick(300), r.pick(300)
    assert {a.prefill, b.prefill} == {"p0:1", "p1:1"} and {a.decode, b.decode} == {"d0:1", "d1:1"}
    r.prefill_done(a, 300)
    r.finished(a)
    c = r.pick(10)
    assert c.prefill == a.prefill and c.decode == a.decode


def test_decode_with_full_kv_is_avoided_even_if_idle() -> None:
    loads = {"p0:1": Info(), "p1:1": Info(), "d0:1": Info(kv_free_bytes=0),
             "d1:1": Info(live_requests=5, kv_free_bytes=10)}
    assert JSQRouter(split_registry(), loads.__getitem__).pick(1).decode == "d1:1"


def test_unreachable_workers_are_skipped_and_none_left_is_unavailable() -> None:
    def info(addr: str) -> Info:
        if addr in ("p0:1", "d0:1"):
            raise Unavailable(f"{addr} down")
        if addr == "d1:1":
            raise OSError("refused")
        return Info()

    r = JSQRouter(split_registry(), info)
    with pytest.raises(Unavailable, match="decode"):
        r.pick(5)


def test_mixed_pool_is_used_when_split_pools_are_absent_or_down() -> None:
    reg = StaticRegistry([Endpoint("mixed", 0, "m0:1"), Endpoint("mixed", 1, "m1:1")])
    loads = {"m0:1": Info(pending_prompt_tokens=50), "m1:1": Info()}
    route = JSQRouter(reg, loads.__getitem__).pick(5)
    assert route.mixed and route.prefill == route.decode == "m1:1" and route.workers == ["m1:1"]
    with pytest.raises(Unavailable, match="mixed"):
        JSQRouter(StaticRegistry([Endpoint("mixed", 0, "m0:1")]), lambda a: (_ for _ in ()).throw(OSError())).pick(1)


def test_round_robin_cycles_and_unknown_policy_is_rejected() -> None:
    loads = {a: Info() for a in ("p0:1", "p1:1", "d0:1", "d1:1")}
    r = RoundRobinRouter(split_registry(), loads.__getitem__)
    routes = [r.pick(1) for _ in range(3)]
    assert [x.prefill for x in routes] == ["p0:1", "p1:1", "p0:1"]
    assert [x.decode for x in routes] == ["d0:1", "d1:1", "d0:1"]
    with pytest.raises(InvalidArgument, match="router.policy"):
        make_router("fastest", split_registry(), loads.__getitem__)


def test_layout_endpoints_ports_and_duplicates() -> None:
    lay = parse_layout({"pools": [{"role": "prefill", "count": 1}, {"role": "decode", "count": 2},
                                  {"role": "decode", "count": 1, "base_port": 60000}]})
    eps = layout_endpoints(lay)
    assert [(e.name, e.address, e.metrics_port) for e in eps] == [
        ("prefill-0", "127.0.0.1:50100", 51100), ("decode-0", "127.0.0.1:50200", 51200),
        ("decode-1", "127.0.0.1:50201", 51201), ("decode-2", "127.0.0.1:60000", 61000)]
    assert [e.name for e in layout_endpoints(Layout())] == ["mixed-0"]
    with pytest.raises(InvalidArgument, match="address"):
        StaticRegistry.from_layout(Layout(pools=[Pool(role="mixed", base_port=7000), Pool(role="mixed", base_port=7000)]))
    reg = StaticRegistry.from_pairs(["prefill=prefill-0:50100", "decode=decode-0:50200", "decode=decode-1:50201"])
    assert [e.name for e in reg.endpoints("decode")] == ["decode-0", "decode-1"]
    with pytest.raises(InvalidArgument, match="worker"):
        StaticRegistry.from_pairs(["gpu=x:1"])


def test_a_down_worker_is_repolled_less_often_than_a_healthy_one() -> None:
    calls: dict[str, int] = {}

    def info(addr: str) -> Info:
        calls[addr] = calls.get(addr, 0) + 1
        if addr == "p0:1":
            raise Unavailable("down")
        return Info()

    r = JSQRouter(split_registry(), info, ttl_s=0.0)
    for _ in range(5):
        assert r.pick(1).prefill == "p1:1"
    assert calls["p0:1"] == 1 and calls["p1:1"] == 5
    r.failed("p0:1")  # forgetting it forces a fresh poll
    r.pick(1)
    assert calls["p0:1"] == 2
