"""The simulator's clock: a SimPy environment with a cheaper path for the simulator's own events.

A worker, the KV fabric and the arrival loop schedule plain calls ("at now + d, call f(x)"). Through SimPy each
such call costs a Timeout object, a functools.partial and a trip through `Environment.step`; at a few events per
simulated request that was about a sixth of the simulator's CPU. `Clock.call` puts the call itself on SimPy's queue, in
the slot `env.timeout(d)` would have taken (same time, priority and sequence number), and `Clock.run` pops and
calls it directly. Everything else SimPy does is untouched: processes, resources and timeouts (the dlm pool) share
the queue and run through SimPy's own step, so the order of every event — and every simulated number — is what
`env.timeout(d).callbacks.append(...)` gave.

`cancel` drops a pending call (a decode segment cut short, a KV flow's superseded finish): it is skipped when it
comes up, and the queue is rebuilt without the dropped calls once they make up half of it. Removing entries
leaves the order of the others as it was (the sequence number breaks every tie), so this only keeps the queue
short: before it, a busy cluster's queue held about three stale entries per live one.

Relies on SimPy's queue layout (`_queue` entries `(time, priority, sequence, event)`, `_eid`), which has
not changed since SimPy 3; `tests/sim` runs every path through it.
"""

from __future__ import annotations

from collections.abc import Callable
from heapq import heapify, heappop, heappush
from typing import Any

import simpy
from simpy.core import NORMAL, URGENT, EmptySchedule, EventPriority, StopSimulation


class Clock(simpy.Environment):
    # `now` is a plain attribute here (SimPy's is a property over `_now`, read several times per event); `step`,
    # `run` and `schedule`, the only SimPy code that touches `_now`, are overridden to use it instead.
    now: float = 0.0  # type: ignore[assignment]

    def __init__(self, initial_time: float = 0) -> None:
        super().__init__(initial_time)
        self.now = self._now
        self._dropped: set[int] = set()  # sequence numbers of cancelled calls still on the queue

    def call(self, delay: float, fn: Callable[[Any], object], arg: Any = None) -> int:
        """Call fn(arg) `delay` seconds from now, ordered exactly as `self.timeout(delay)` would be. Returns the
        call's sequence number, for `cancel`."""
        if delay < 0:
            raise ValueError(f"Negative delay {delay}")  # what SimPy's Timeout raises
        eid = next(self._eid)
        heappush(self._queue, (self.now + delay, NORMAL, eid, fn, arg))
        return eid

    def schedule(self, event: simpy.Event, priority: EventPriority = NORMAL, delay: float = 0) -> None:
        """SimPy's schedule (its events: the dlm pool's timeouts, processes, resources), on this clock's `now`."""
        heappush(self._queue, (self.now + delay, priority, next(self._eid), event))

    def cancel(self, eid: int) -> None:
        """Drop a pending call (one that `call` returned and that has not come up yet)."""
        dropped = self._dropped
        dropped.add(eid)
        queue = self._queue
        if len(dropped) > 16 and 2 * len(dropped) > len(queue):
            queue[:] = [item for item in queue if item[2] not in dropped]
            heapify(queue)
            dropped.clear()

    def step(self) -> None:
        """SimPy's step, also for `call` entries (so `env.run()` works on a mix of both)."""
        try:
            item = heappop(self._queue)
        except IndexError:
            raise EmptySchedule from None
        if len(item) == 5:
            if item[2] in self._dropped:
                self._dropped.discard(item[2])
                return
            self.now = item[0]
            item[3](item[4])
        else:
            self.now = item[0]
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
        if at <= self.now:
            raise ValueError(f"until ({at}) must be greater than the current simulation time")
        stop = (self.now + (at - self.now), URGENT, next(self._eid))
        queue, dropped = self._queue, self._dropped
        try:
            while queue and queue[0] < stop:
                item = heappop(queue)
                if dropped and item[2] in dropped:
                    dropped.discard(item[2])
                    continue
                self.now = item[0]
                try:
                    arg = item[4]  # a `call` (5 fields); SimPy's own entries have 4
                except IndexError:
                    self._fire(item[3])
                else:
                    item[3](arg)
        except StopSimulation as exc:  # an event-based stop left over from an earlier run(until=event)
            return exc.args[0]
        self.now = stop[0]
        return None
