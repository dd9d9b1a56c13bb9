"""Which workers serve a request: Splitwise's join-the-shortest-queue policy behind a small Router interface.

The ranking (prefill by pending prompt tokens, decode by batch load and free KV memory) is
`services.contracts.routing`, shared with the simulator. Loads come from `WorkerClient.info()` (cached for
`ttl_s`) plus what this router itself has in flight: a pick reserves its share (prompt tokens on the prefill
worker, one request on the decode worker) under the same lock it chose under, so concurrent picks see each
other and a burst spreads out.
"""

from __future__ import annotations

import abc
import itertools
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from services.contracts import routing
from services.contracts.errors import InvalidArgument, TandemError, Unavailable
from services.contracts.routing import Load
from services.registry import Registry


@dataclass(frozen=True, slots=True)
class Route:
    """Where one request goes. A mixed route runs both phases on `prefill` (== `decode`)."""

    prefill: str
    decode: str
    mixed: bool = False

    @property
    def workers(self) -> list[str]:
        return [self.prefill] if self.mixed else [self.prefill, self.decode]


class Router(Protocol):
    """The policy interface: pick a route for a prompt; hear back when its phases end."""

    def pick(self, prompt_tokens: int) -> Route: ...

    def prefill_done(self, route: Route, prompt_tokens: int) -> None: ...

    def finished(self, route: Route) -> None: ...


InfoFn = Callable[[str], Any]
DOWN_TTL_S = 1.0  # address -> WorkerInfo (raises on an unreachable worker)


@dataclass(slots=True)
class _Board:
    """Polled loads plus this router's own in-flight work per address."""

    info: InfoFn
    ttl_s: float
    polled: dict[str, tuple[float, Load]] = field(default_factory=dict)
    sent_tokens: dict[str, int] = field(default_factory=dict)
    sent_requests: dict[str, int] = field(default_factory=dict)
    down_until: dict[str, float] = field(default_factory=dict)  # monotonic; the gateway's local health marks
    lock: threading.RLock = field(default_factory=threading.RLock)

    def poll(self, address: str) -> None:
        """Refresh a stale poll (outside any lock: a hung worker delays only the pick that polls it)."""
        now = time.monotonic()
        if now < self.down_until.get(address, 0.0):
            return  # marked down by the gateway (a stalled or failed call): not even polled for now
        hit = self.polled.get(address)
        # a worker found down is re-polled less often, so one hung worker does not stall every pick
        if hit is None or now - hit[0] > (self.ttl_s if hit[1].healthy else max(self.ttl_s, DOWN_TTL_S)):
            try:
                i = self.info(address)
                load = Load(address, i.pending_prompt_tokens, i.live_requests, i.waiting_requests,
                            i.kv_free_bytes, i.kv_total_bytes)
            except (TandemError, OSError, TimeoutError):
                load = Load(address, healthy=False)
            self.polled[address] = (now, load)

    def view(self, address: str) -> Load:
        """The last poll plus this router's reservations (call under `lock` when choosing)."""
        hit = self.polled.get(address)
        base = hit[1] if hit is not None else Load(address, healthy=False)
        healthy = base.healthy and time.monotonic() >= self.down_until.get(address, 0.0)
        return Load(address, base.pending_prompt_tokens + self.sent_tokens.get(address, 0),
                    base.live_requests + self.sent_requests.get(address, 0), base.waiting_requests,
                    base.kv_free_bytes, base.kv_total_bytes, healthy)

    def load(self, address: str) -> Load:
        self.poll(address)
        with self.lock:
            return self.view(address)

    def add(self, address: str, tokens: int = 0, requests: int = 0) -> None:
        with self.lock:
            self.sent_tokens[address] = max(0, self.sent_tokens.get(address, 0) + tokens)
            self.sent_requests[address] = max(0, self.sent_requests.get(address, 0) + requests)

    def forget(self, address: str, hold_s: float = 0.0) -> None:
        """Drop a cached poll (e.g. after a call to it failed) so the next pick re-polls; `hold_s` > 0 also
        keeps the worker out of every pick (and unpolled) for that long."""
        self.polled.pop(address, None)
        if hold_s > 0:
            self.down_until[address] = time.monotonic() + hold_s


class _BaseRouter(abc.ABC):
    def __init__(self, registry: Registry, info: InfoFn, ttl_s: float = 0.1) -> None:
        self.registry = registry
        self.board = _Board(info, ttl_s)

    def _healthy(self, role: str, exclude: frozenset[str] = frozenset()) -> list[Load]:
        loads = (self.board.view(e.address) for e in self.registry.endpoints(role) if e.address not in exclude)
        return [ld for ld in loads if ld.healthy]

    def pick(self, prompt_tokens: int, exclude: frozenset[str] = frozenset()) -> Route:
        """A route avoiding `exclude` (workers that already failed this request); reserves its load."""
        for ep in self.registry.all():
            if ep.role in ("prefill", "decode", "mixed") and ep.address not in exclude:
                self.board.poll(ep.address)
        with self.board.lock:  # choose and reserve in one step, so concurrent picks see each other
            prefill, decode = self._healthy("prefill", exclude), self._healthy("decode", exclude)
            picked = routing.route(prefill, decode, lambda: self._healthy("mixed", exclude), self._choose)
            if picked is None:
                missing = "prefill" if not prefill else "decode"
                if not self.registry.endpoints("prefill") and not self.registry.endpoints("decode"):
                    missing = "mixed"
                raise Unavailable(f"no healthy {missing} worker to route to"
                                  + (f" (avoiding {', '.join(sorted(exclude))})" if exclude else ""))
            p, d, mixed = picked
            route = Route(str(p.address), str(d.address), mixed=mixed)
            self.board.add(route.prefill, tokens=prompt_tokens)
            self.board.add(route.decode, requests=1)
        return route

    def prefill_done(self, route: Route, prompt_tokens: int) -> None:
        self.board.add(route.prefill, tokens=-prompt_tokens)

    def finished(self, route: Route) -> None:
        self.board.add(route.decode, requests=-1)

    def failed(self, address: str, hold_s: float = 0.0) -> None:
        """A call to `address` failed: re-poll it before trusting it again; `hold_s` > 0 avoids it that long."""
        self.board.forget(address, hold_s)

    @abc.abstractmethod
    def _choose(self, loads: list[Load], key: Callable[[Load], tuple]) -> Load:
        """The worker to use among the healthy `loads` (each policy's one decision)."""


class JSQRouter(_BaseRouter):
    """Splitwise's policy: the least-loaded worker of each pool (ties go to registry order)."""

    def _choose(self, loads: list[Load], key: Callable[[Load], tuple]) -> Load:
        return routing.jsq(loads, key)


class RoundRobinRouter(_BaseRouter):
    """Each pool in turn, skipping unhealthy workers (a baseline for the benchmarks)."""

    def __init__(self, registry: Registry, info: InfoFn, ttl_s: float = 0.1) -> None:
        super().__init__(registry, info, ttl_s)
        self._counters: dict[Callable, itertools.count] = {}  # one turn per pool (keyed by its ranking)

    def _choose(self, loads: list[Load], key: Callable[[Load], tuple]) -> Load:
        return loads[next(self._counters.setdefault(key, itertools.count())) % len(loads)]


class RandomRouter(_BaseRouter):
    def __init__(self, registry: Registry, info: InfoFn, ttl_s: float = 0.1, seed: int | None = None) -> None:
        super().__init__(registry, info, ttl_s)
        self._rng = random.Random(seed)

    def _choose(self, loads: list[Load], key: Callable[[Load], tuple]) -> Load:
        return self._rng.choice(loads)


POLICIES: dict[str, type[_BaseRouter]] = {"jsq": JSQRouter, "round_robin": RoundRobinRouter, "random": RandomRouter}


def make_router(policy: str, registry: Registry, info: InfoFn, ttl_s: float = 0.1) -> _BaseRouter:
    """The router a layout's `router.policy` names."""
    try:
        return POLICIES[policy](registry, info, ttl_s)
    except KeyError:
        raise InvalidArgument(f"router.policy: unknown policy {policy!r} (known: {sorted(POLICIES)})") from None


class LeastBusy:
    """One pool of workers without a load RPC (the dlm pool): the worker with the fewest requests this gateway
    has in flight, ties in turn; a worker whose call failed is skipped for DOWN_TTL_S (all down: try anyway)."""

    def __init__(self, registry: Registry, role: str) -> None:
        self.registry, self.role = registry, role
        self._inflight: dict[str, int] = {}
        self._down: dict[str, float] = {}
        self._turn = itertools.count()
        self._lock = threading.Lock()

    def pick(self) -> str:
        eps = [e.address for e in self.registry.endpoints(self.role)]
        if not eps:
            raise Unavailable(f"no {self.role} worker to route to")
        now = time.monotonic()
        with self._lock:
            up = [a for a in eps if now - self._down.get(a, -DOWN_TTL_S) >= DOWN_TTL_S] or eps
            start = next(self._turn)
            order = up[start % len(up):] + up[:start % len(up)]
            addr = min(order, key=lambda a: self._inflight.get(a, 0))
            self._inflight[addr] = self._inflight.get(addr, 0) + 1
            return addr

    def finished(self, address: str) -> None:
        with self._lock:
            self._inflight[address] = max(0, self._inflight.get(address, 0) - 1)

    def failed(self, address: str) -> None:
        with self._lock:
            self._down[address] = time.monotonic()
