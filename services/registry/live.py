"""Workers known by their heartbeats: a record lives one TTL after its last beat, and carries the worker's load.

`LiveRegistry` is the view the router reads (no RPC per pick). Two ways to fill it:
- `MemoryRegistry` (the embedded default, no server): a `Poller` in the gateway asks each worker of the layout
  for its Info every `interval_s`; an answer is a heartbeat, a failed call removes the worker at once.
- `RedisRegistry` (services.registry.redis_store): workers write their own heartbeats (`Heartbeat`), the gateway
  reads them back in the background.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, fields
from typing import Any, Protocol

from services.contracts.errors import DeadlineExceeded, TandemError, Unavailable
from services.contracts.registry_url import DEFAULT_TTL_S
from services.grpcutil import get_logger, log
from services.registry import Endpoint

logger = get_logger("tandem.registry")


@dataclass(frozen=True, slots=True)
class WorkerRecord:
    """What a worker registers (role, address, model fingerprint, capacity) and renews with its live load.

    The load fields keep WorkerInfo's names, so the router reads a record like an Info answer.
    """

    role: str
    address: str
    index: int = 0
    model: str = ""
    fingerprint: str = ""
    max_batch: int = 0
    max_seq_len: int = 0
    kv_total_bytes: int = 0
    pending_prompt_tokens: int = 0  # prompts queued or running on a prefill worker, in tokens
    live_requests: int = 0  # requests in the decode batch
    waiting_requests: int = 0  # requests queued behind the batch
    kv_free_bytes: int = 0
    metrics_port: int | None = None

    @classmethod
    def from_info(cls, info: Any, address: str, index: int = 0, max_batch: int = 0,
                  metrics_port: int | None = None) -> WorkerRecord:
        """From a WorkerInfo (client dataclass or pb message); `address` is how others reach the worker."""
        return cls(info.role, address, index, info.model, info.fingerprint, max_batch, info.max_seq_len,
                   info.kv_total_bytes, info.pending_prompt_tokens, info.live_requests, info.waiting_requests,
                   info.kv_free_bytes, metrics_port)

    def endpoint(self) -> Endpoint:
        return Endpoint(self.role, self.index, self.address, self.metrics_port)

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> WorkerRecord:
        doc = json.loads(text)
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in doc.items() if k in known})


class Store(Protocol):
    """Where heartbeats go (a worker's side of a registry)."""

    ttl_s: float

    def heartbeat(self, record: WorkerRecord) -> None: ...

    def deregister(self, address: str) -> None: ...


class LiveRegistry:
    """The router's view: live records by address, each with a monotonic deadline; `fixed` endpoints (roles that
    do not heartbeat, e.g. dlm) are always listed."""

    def __init__(self, ttl_s: float = DEFAULT_TTL_S, fixed: Iterable[Endpoint] = ()) -> None:
        self.ttl_s = ttl_s
        self.fixed = list(fixed)
        self._records: dict[str, tuple[WorkerRecord, float]] = {}
        self._beats: dict[str, float] = {}  # address -> monotonic time of its last heartbeat (kept when it drops out)
        self._lock = threading.Lock()

    def _expires(self) -> bool:
        """False while the view cannot be refreshed (Redis lost): routing goes on with the last known view."""
        return True

    def live(self) -> list[WorkerRecord]:
        """Records whose heartbeat is within its TTL. A role whose every worker lapsed at once keeps its last known
        workers instead (more likely the heartbeats are late, e.g. a starved machine, than every worker dead; calls
        to a dead one fail and are retried elsewhere); a deregistered worker is gone at once regardless."""
        now, expires = time.monotonic(), self._expires()
        with self._lock:
            known = [(r, deadline) for r, deadline in self._records.values()]
        fresh = [r for r, deadline in known if not expires or deadline > now]
        roles = {r.role for r in fresh}
        recs = fresh + [r for r, deadline in known if r.role not in roles and deadline <= now]
        return sorted(recs, key=lambda r: (r.role, r.index, r.address))

    def endpoints(self, role: str) -> list[Endpoint]:
        return [e for e in self.all() if e.role == role]

    def all(self) -> list[Endpoint]:
        return [r.endpoint() for r in self.live()] + list(self.fixed)

    def info(self, address: str) -> WorkerRecord:
        """The worker's last heartbeat (the router's load source); Unavailable once it is out of `live()`."""
        with self._lock:
            hit = self._records.get(address)
        if hit is not None and (not self._expires() or hit[1] > time.monotonic()):
            return hit[0]
        if hit is not None and any(r.address == address for r in self.live()):
            return hit[0]
        raise Unavailable(f"worker {address} has no live heartbeat in the registry")

    def last_beat(self, address: str) -> float | None:
        """When the worker last gave a sign of life (time.monotonic()), also after it dropped out of the view;
        now, while the view cannot be refreshed (Redis lost: no news is not bad news); None if never seen."""
        if not self._expires():
            return time.monotonic()
        with self._lock:
            return self._beats.get(address)

    def _put(self, record: WorkerRecord, deadline: float) -> None:
        with self._lock:
            self._records[record.address] = (record, deadline)
            beat = deadline - self.ttl_s  # a record lives one TTL after its beat; a stale read never moves it back
            self._beats[record.address] = max(beat, self._beats.get(record.address, beat))

    def _drop(self, address: str) -> None:
        with self._lock:
            self._records.pop(address, None)

    def close(self) -> None:
        pass


class MemoryRegistry(LiveRegistry):
    """The in-process registry: heartbeats are method calls (from a Poller, or workers in this process)."""

    def __init__(self, ttl_s: float = DEFAULT_TTL_S, fixed: Iterable[Endpoint] = ()) -> None:
        super().__init__(ttl_s, fixed)
        self.pollers: list[Poller] = []

    def heartbeat(self, record: WorkerRecord) -> None:
        self._put(record, time.monotonic() + self.ttl_s)

    register = heartbeat

    def deregister(self, address: str) -> None:
        self._drop(address)

    def seen(self, address: str) -> None:
        """A sign of life that is no heartbeat (it answered, but refused): counts for `last_beat` only."""
        with self._lock:
            self._beats[address] = time.monotonic()

    def close(self) -> None:
        for poller in self.pollers:
            poller.stop()


class Poller:
    """Heartbeats on the workers' behalf (the embedded registry): one thread per worker asks for its Info every
    `interval_s`; an answer renews its record, a failed or refused call (down, loading, draining) removes it."""

    def __init__(self, registry: MemoryRegistry, endpoints: Iterable[Endpoint],
                 info: Callable[[str, float], Any], interval_s: float = 0.25) -> None:
        self.registry, self.info, self.interval_s = registry, info, interval_s
        self.endpoints = list(endpoints)
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(ep,), name=f"poll-{ep.name}", daemon=True)
                         for ep in self.endpoints]

    def start(self) -> Poller:
        self.registry.pollers.append(self)
        for ep in self.endpoints:  # one synchronous round first, so a new gateway routes at once
            self._beat(ep)
        for t in self._threads:
            t.start()
        return self

    def _beat(self, ep: Endpoint) -> None:
        try:
            info = self.info(ep.address, min(1.0, self.registry.ttl_s))
        except (TandemError, OSError, TimeoutError) as exc:
            self.registry.deregister(ep.address)
            if isinstance(exc, TandemError) and not isinstance(exc, DeadlineExceeded):
                self.registry.seen(ep.address)  # it answered (draining, loading): alive, just not taking work
            return
        self.registry.heartbeat(WorkerRecord.from_info(info, ep.address, ep.index, metrics_port=ep.metrics_port))

    def _run(self, ep: Endpoint) -> None:
        while not self._stop.wait(self.interval_s):
            self._beat(ep)

    def stop(self) -> None:
        self._stop.set()


class Heartbeat:
    """A worker's side: renew `record()` in `store` every TTL / 3; log when the store is lost and found again
    (each beat rewrites the whole record, so a restarted Redis gets it back); `stop()` deregisters."""

    def __init__(self, store: Store, record: Callable[[], WorkerRecord], interval_s: float | None = None) -> None:
        self.store, self.record = store, record
        self.interval_s = interval_s or store.ttl_s / 3
        self.address = ""
        self.beats = 0
        self._lost: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)

    def start(self) -> Heartbeat:
        self.beat()
        self._thread.start()
        return self

    def beat(self) -> bool:
        try:
            rec = self.record()
        except TandemError:  # the worker cannot report (draining): it is not taking work
            if self.address:
                self._deregister()
            return False
        self.address = rec.address
        try:
            self.store.heartbeat(rec)
        except Exception as exc:  # noqa: BLE001 - any store failure: keep serving, keep trying
            if self._lost is None:
                self._lost = str(exc) or type(exc).__name__
                log(logger, "registry unreachable; serving on, will re-register", address=rec.address,
                    error=self._lost)
            return False
        if self._lost is not None or self.beats == 0:
            log(logger, "registered" if self.beats == 0 else "registry reachable again; re-registered",
                address=rec.address, role=rec.role, ttl_s=self.store.ttl_s)
        self._lost = None
        self.beats += 1
        return True

    def _run(self) -> None:
        wait = self.interval_s
        while not self._stop.wait(wait):
            wait = self.interval_s if self.beat() else min(self.interval_s, 0.2)  # late: retry soon

    def _deregister(self) -> None:
        try:
            self.store.deregister(self.address)
            log(logger, "deregistered", address=self.address)
        except Exception as exc:  # noqa: BLE001 - the record lapses on its own within one TTL
            log(logger, "deregister failed; the record lapses within one TTL", address=self.address, error=str(exc))

    def stop(self) -> None:
        """Stop beating and deregister (the first step of a drain: routers stop sending work)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=2.0)
        if self.address:
            self._deregister()

