"""The shared JSQ decision: a pool that keeps its keys current (routing.Ranked, the simulator's) picks exactly what
ranking a plain list of the same loads picks (the runtime's), through every kind of load change."""

from __future__ import annotations

import random

import pytest

from services.contracts import routing
from services.contracts.routing import Load, Ranked


def _loads(n: int, rng: random.Random) -> list[Load]:
    total = 1000 * rng.choice([1, 2, 3])
    return [Load(i, kv_free_bytes=total, kv_total_bytes=total) for i in range(n)]


@pytest.mark.parametrize("key", [routing.prefill_key, routing.decode_key], ids=["prefill", "decode"])
def test_ranked_pool_picks_what_a_list_picks(key: routing.Key) -> None:
    rng = random.Random(7)
    for n in (1, 2, 5, 40):
        loads = _loads(n, rng)
        ranked = Ranked(loads, key)
        picks = 0
        for _ in range(3000):
            i = rng.randrange(n)
            ld = loads[i]
            change = rng.randrange(4)
            if change == 0:
                ld.pending_prompt_tokens = max(0, ld.pending_prompt_tokens + rng.choice([-512, -1, 1, 700]))
            elif change == 1:
                ld.live_requests = max(0, ld.live_requests + rng.choice([-1, 1]))
            elif change == 2:
                ld.waiting_requests = max(0, ld.waiting_requests + rng.choice([-1, 1]))
            else:  # KV in use, full, or over-assigned (negative free)
                ld.kv_free_bytes = rng.choice([ld.kv_total_bytes, 0, -5, rng.randrange(ld.kv_total_bytes)])
            ranked.update(i)
            got = routing.jsq(ranked, key)
            assert got is routing.jsq(list(loads), key) is min(loads, key=key)
            picks += got.address != 0
        assert n == 1 or picks > 100  # the pick moved around: ties, first-in-order and every key field exercised


def test_ties_go_to_the_first_in_order() -> None:
    loads = [Load(a, kv_free_bytes=10, kv_total_bytes=10) for a in "abc"]
    ranked = Ranked(loads, routing.prefill_key)
    assert routing.jsq(ranked, routing.prefill_key).address == "a"
    loads[0].pending_prompt_tokens = 5
    ranked.update(0)
    assert routing.jsq(ranked, routing.prefill_key).address == "b"
    # a Ranked asked for another key than its own ranks the loads afresh
    assert routing.jsq(ranked, routing.decode_key).address == "a"


def test_route_takes_ranked_pools() -> None:
    p = Ranked([Load("p0", pending_prompt_tokens=9), Load("p1")], routing.prefill_key)
    d = Ranked([Load("d0", live_requests=2), Load("d1", live_requests=1)], routing.decode_key)
    pl, dl, mixed = routing.route(p, d, lambda: [])
    assert (pl.address, dl.address, mixed) == ("p1", "d1", False)
    empty = Ranked([], routing.prefill_key)
    m = Ranked([Load("m0", live_requests=1), Load("m1")], routing.prefill_key)
    pl, dl, mixed = routing.route(empty, empty, lambda: m)
    assert (pl.address, dl.address, mixed) == ("m1", "m1", True)
