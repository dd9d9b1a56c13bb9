"""The simulator's clock (sim/clock.py) runs events in exactly the order and at exactly the times SimPy's own
timeouts would, cancelled calls never run, and SimPy processes share its queue."""

from __future__ import annotations

import random

import pytest
import simpy

from sim.clock import Clock


def _script(env: simpy.Environment, fast: bool, seed: int, log: list) -> None:
    """A random cascade of events: each one logs itself and schedules 1–2 more, some at equal times; with `fast`
    through Clock.call/cancel, else through SimPy timeouts (a cancel is then a version check, as the simulator did
    before the clock had `cancel`). A SimPy process ticks alongside."""
    rng = random.Random(seed)
    live: dict[int, int] = {}  # chain -> version of its pending event
    handles: dict[int, int] = {}

    def fire(arg: tuple[int, int]) -> None:
        chain, version = arg
        if live.get(chain) != version:
            log.append(("stale-ran", chain))  # only the SimPy side may get here
            return
        log.append((env.now, chain, version))
        for _ in range(rng.choice([1, 1, 2])):
            schedule(rng.randrange(6), rng.choice([0.0, 0.25, 0.5, rng.random()]))

    def schedule(chain: int, delay: float) -> None:
        version = live.get(chain, 0) + 1
        if fast and chain in live and chain in handles:
            env.cancel(handles[chain])  # type: ignore[attr-defined]
        live[chain] = version
        if fast:
            handles[chain] = env.call(delay, fire, (chain, version))  # type: ignore[attr-defined]
        else:
            env.timeout(delay).callbacks.append(lambda _ev, a=(chain, version): fire(a))

    def ticker():
        while True:
            yield env.timeout(0.5)
            log.append((env.now, "tick"))

    env.process(ticker())
    for c in range(6):
        schedule(c, rng.random())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_clock_orders_events_like_simpy(seed: int) -> None:
    slow, fast = simpy.Environment(), Clock()
    log_slow: list = []
    log_fast: list = []
    _script(slow, False, seed, log_slow)
    _script(fast, True, seed, log_fast)
    slow.run(until=40.0)
    for t in (3.0, 3.5, 17.25, 40.0):  # in pieces, as the simulator runs with a progress bar
        fast.run(until=t)
    assert fast.now == slow.now == 40.0
    ran = [e for e in log_slow if e[0] != "stale-ran"]
    assert len(ran) > 100 and len(ran) < len(log_slow)  # a real cascade, with superseded events on the SimPy side
    assert log_fast == ran  # same events, same order, same times; no cancelled call ran


def test_cancelled_calls_leave_the_queue() -> None:
    env = Clock()
    hits: list[int] = []
    handles = [env.call(1.0 + i, hits.append, i) for i in range(100)]
    for h in handles[:90]:
        env.cancel(h)
    assert len(env._queue) <= 60  # rebuilt once the cancelled calls were the larger part
    env.run()
    assert hits == list(range(90, 100))


def test_negative_delay_is_refused_as_simpy_does() -> None:
    with pytest.raises(ValueError, match="Negative delay"):
        Clock().call(-1e-9, print)
    with pytest.raises(ValueError, match="Negative delay"):
        simpy.Environment().timeout(-1e-9)
