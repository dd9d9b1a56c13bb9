"""The simulator's clock: a SimPy environment with a cheaper path for the simulator's own events.

A worker, the KV fabric and the arrival loop schedule plain calls ("at now + d, call f(x)"). Through SimPy each
such call costs a Timeout object, a functools.partial and a trip through `Environment.step`; at a few events per
simulated request that was a fifth of the simulator's CPU. `Clock.call` puts the call itself on SimPy's queue, in
the slot `env.timeout(d)` would have taken (same time, priority and sequence number), and `Clock.run` pops and
calls it directly. Everything else SimPy does is untouched: processes, resources and timeouts (the dlm pool) share
the queue and run through SimPy's own step, so the order of every event — and every simulated number — is what
`env.timeout(d).callbacks.append(...)` gave.

Relies on SimPy's queue layout (`_queue` entries `(time, priority, sequence, event)`, `_eid`, `_now`), which has
not changed since SimPy 3; `tests/sim` runs every path through it.
"""

from __future__ import annotations

from collections.abc import Callable
from heapq import heappop, heappush
from typing import Any

import simpy
from simpy.core import NORMAL, URGENT, EmptySchedule, EventPriority, StopSimulation


class Clock(simpy.Environment):
    # `now` is a plain attribute here (SimPy's is a property over `_now`): it is read several times per event.
    # Every path that moves the clock (`step`, `run`) sets both.
    now: float = 0.0  # type: ignore[assignment]

    def __init__(self, initial_time: float = 0) -> None:
        super().__init__(initial_time)
        self.now = self._now

    def call(self, delay: float, fn: Callable[[Any], object], arg: Any = None) -> None:
        """Call fn(arg) `delay` seconds from now, ordered exactly as `self.timeout(delay)` would be."""
        if delay < 0:
            raise ValueError(f"Negative delay {delay}")  # what SimPy's Timeout raises
        heappush(self._queue, (self._now + delay, NORMAL, next(self._eid), fn, arg))

    def step(self) -> None:
        """SimPy's step, also for `call` entries (so `env.run()` works on a mix of both)."""
        try:
            item = heappop(self._queue)
        except IndexError:
            raise EmptySchedule from None
        self._now = self.now = item[0]
        if len(item) == 5:
            item[3](item[4])
        else:
            self._fire(item[3])

    def _fire(self, event: simpy.Event) -> None:
        """Run a SimPy event's callbacks the way `Environment.step` does."""
        callbacks, event.callbacks = event.callbacks, None
        try:
            for callback in callbacks:
                callback(event)
        except StopSimulation:
            event.callbacks = callbacks[callbacks.index(callback) + 1:]
            self.schedule(event, EventPriority(-1))
            raise
        if not event._ok and not hasattr(event, "_defused"):
            exc = type(event._value)(*event._value.args)
            exc.__cause__ = event._value
            raise exc

    def run(self, until: Any = None) -> Any:
        """`Environment.run`; with a number, an inlined loop equivalent to it: SimPy would schedule a stop event at
        `until` (URGENT: before every normal event at that time) and step until it comes up."""
        if until is None or isinstance(until, simpy.Event):
            return super().run(until)  # steps through self.step
        at = until if isinstance(until, int) else float(until)
        if at <= self._now:
            raise ValueError(f"until ({at}) must be greater than the current simulation time")
        stop = (self._now + (at - self._now), URGENT, next(self._eid))
        queue = self._queue
        try:
            while queue and queue[0] < stop:
                item = heappop(queue)
                self._now = self.now = item[0]
                if len(item) == 5:
                    item[3](item[4])
                else:
                    self._fire(item[3])
        except StopSimulation as exc:  # an event-based stop left over from an earlier run(until=event)
            return exc.args[0]
        self._now = self.now = stop[0]
        return None
