"""KV transfers between workers as fluid flows over shared links (the layout's `kv_link`).

Each worker has one link of `kv_link.bandwidth_gbps`, used by the transfers leaving it (a prefill worker
pushing KV) and those entering it (a decode worker receiving). While n flows leave a worker and m enter the
destination, a flow gets the smaller of the two equal shares, link/n and link/m (and, when the layout names a
switch, switch/total flows): an equal split at each end, not a max-min allocation, so capacity one flow cannot
use is not handed to the others. Rates are recomputed whenever a flow starts or ends, so one SimPy event per
change serves every flow in flight.

Layer-wise overlap (`sim.kv_transfer: layerwise`, the default): a prefill of duration t over L layers makes its
first layer's KV ready at t/L; the flow starts then, and the request is delivered at the later of the flow's
end and the prefill's end plus the last layer's own share. Alone on its links this is exactly the closed form
`max(T/L, T - t·(L-1)/L)` after the prefill (T = bytes / link). The fluid flow may run ahead of the layers
being produced when it is alone (it is then hidden behind the prefill anyway); under contention the share, not
the production, bounds it. `after_prefill` starts the whole transfer when the prefill ends (splitwise-sim's
KV flow). `sim.kv_link_sharing: none` gives every flow the full link whatever else is in flight
(splitwise-sim's DummyLink).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sim.clock import Clock


class Flow:
    __slots__ = ("src", "dst", "left", "rate", "floor", "on_done", "arg")

    def __init__(self, src: int, dst: int, nbytes: float, floor: float, on_done: Callable[[Any], object],
                 arg: Any) -> None:
        self.src, self.dst, self.left, self.rate, self.floor = src, dst, nbytes, 0.0, floor
        self.on_done, self.arg = on_done, arg


class Fabric:
    """Every worker's KV link, shared by the flows in flight (see the module docstring)."""

    def __init__(self, env: Clock, n_workers: int, link_gbps: float, latency_s: float = 0.0,
                 switch_gbps: float | None = None, sharing: str = "fair") -> None:
        self.env = env
        self.link_Bps = link_gbps * 1e9 / 8.0
        self.switch_Bps = switch_gbps * 1e9 / 8.0 if switch_gbps else None
        self.latency = latency_s
        self.shared = sharing == "fair"
        self.flows: list[Flow] = []
        self.n_out = [0] * n_workers
        self.n_in = [0] * n_workers
        self.t_last = 0.0
        self.tick = -1  # the clock's sequence number of the pending _tick (-1: none)
        self.started = 0  # flows ever started (tests, bench)

    def send(self, src: int, dst: int, nbytes: float, ready_at: float, floor: float,
             on_done: Callable[[Any], object], arg: Any = None) -> None:
        """Move `nbytes` from worker src to dst, starting at `ready_at` (>= now); call on_done(arg) when the last
        byte has arrived, no earlier than `floor`, plus the link latency."""
        f = Flow(src, dst, nbytes, floor, on_done, arg)
        delay = ready_at - self.env.now
        if delay > 0:
            self.env.call(delay, self._start, f)
        else:
            self._start(f)

    def alone_s(self, nbytes: float) -> float:
        """Seconds `nbytes` take on an idle link."""
        return nbytes / self.link_Bps

    # -- the fluid model ------------------------------------------------------------------------------------
    def _start(self, f: Flow) -> None:
        now = self.env.now  # _progress, inlined
        dt = now - self.t_last
        if dt > 0:
            for g in self.flows:
                g.left -= g.rate * dt
        self.t_last = now
        self.flows.append(f)
        self.n_out[f.src] += 1
        self.n_in[f.dst] += 1
        self.started += 1
        self._reschedule()

    def _progress(self) -> None:
        now = self.env.now
        dt = now - self.t_last
        if dt > 0:
            for f in self.flows:
                f.left -= f.rate * dt
        self.t_last = now

    def _reschedule(self) -> None:
        link, n_out, n_in, flows, shared = self.link_Bps, self.n_out, self.n_in, self.flows, self.shared
        sw = self.switch_Bps / len(flows) if self.switch_Bps and flows else None
        soonest = float("inf")
        for f in flows:  # (max/min written out: the same values as the builtins, without their calls)
            if shared:
                no, ni = n_out[f.src], n_in[f.dst]
                rate = link / (ni if ni > no else no)
                if sw is not None and sw < rate:
                    rate = sw
            else:
                rate = link
            f.rate = rate
            left = f.left
            due = (0.0 if 0.0 > left else left) / rate
            if due < soonest:
                soonest = due
        if self.tick >= 0:
            self.env.cancel(self.tick)  # superseded by the rates just computed: it never comes
        self.tick = self.env.call(soonest, self._tick) if flows else -1

    def _tick(self, _: object = None) -> None:
        self.tick = -1
        now = self.env.now  # _progress, inlined
        dt = now - self.t_last
        flows = self.flows
        if dt > 0:
            for f in flows:
                f.left -= f.rate * dt
        self.t_last = now
        eps = self.link_Bps * 1e-9  # a nanosecond's worth of bytes: float dust
        done = [f for f in flows if f.left <= eps]
        if done:
            self.flows = [f for f in flows if not f.left <= eps]
            n_out, n_in = self.n_out, self.n_in
            for f in done:
                n_out[f.src] -= 1
                n_in[f.dst] -= 1
        self._reschedule()
        for f in done:
            at = max(now, f.floor) + self.latency
            if at > now:
                self.env.call(at - now, f.on_done, f.arg)
            else:
                f.on_done(f.arg)
