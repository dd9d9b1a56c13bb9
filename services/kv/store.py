"""Received KV on a decode worker: in-flight pushes and leased caches within a byte budget, freed by ownership.

A push reserves its bytes at the header; a stalled push is cancelled by the reaper; a finished push becomes a
lease that expires (and frees its memory) unless Decode claims it in time.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from services.contracts.errors import NotFound, ResourceExhausted, Unavailable

Layers = list[tuple[torch.Tensor, torch.Tensor]]


@dataclass(slots=True, eq=False)
class Entry:
    request_id: str
    nbytes: int
    deadline: float  # monotonic: stall deadline while in flight, lease expiry once received
    cancel: Callable[[], None] | None = None  # stops an in-flight push (the RPC's context.cancel)
    layers: Layers = field(default_factory=list)
    n_tokens: int = 0
    stall_s: float = 0.0  # while in flight: the longest silence between pieces


class KVStore:
    """Owns received KV until Decode claims it. `used_bytes` counts in-flight and leased caches."""

    def __init__(self, budget_bytes: int, lease_s: float = 30.0, stall_s: float = 10.0,
                 other_used: Callable[[], int] = lambda: 0, on_expire: Callable[[Entry, str], None] | None = None,
                 max_held: int | None = None, other_held: Callable[[], int] = lambda: 0) -> None:
        self.budget_bytes = budget_bytes
        self.lease_s, self.stall_s = lease_s, stall_s
        # KV the decode scheduler holds, sharing the same budget: its live rows AND the requests it has
        # claimed but not admitted yet (their reservations), so free_bytes never over-reports
        self.other_used = other_used
        self.max_held, self.other_held = max_held, other_held  # a bound on requests held (ours + the scheduler's)
        self.draining = False
        self.on_expire = on_expire
        self._lock = threading.Lock()
        self._inflight: dict[str, Entry] = {}
        self._leased: dict[str, Entry] = {}
        self._stop = threading.Event()
        self._reaper = threading.Thread(target=self._reap_loop, name="kv-reaper", daemon=True)
        self._reaper.start()

    @property
    def used_bytes(self) -> int:
        with self._lock:
            return sum(e.nbytes for e in self._inflight.values()) + sum(e.nbytes for e in self._leased.values())

    @property
    def free_bytes(self) -> int:
        return max(0, self.budget_bytes - self.used_bytes - self.other_used())

    @property
    def pushing(self) -> int:
        with self._lock:
            return len(self._inflight)

    @property
    def waiting(self) -> int:
        with self._lock:
            return len(self._inflight) + len(self._leased)

    def begin(self, request_id: str, nbytes: int, cancel: Callable[[], None], stall_s: float | None = None) -> str:
        """Reserve a push's bytes; returns its ticket. ResourceExhausted when the budget or the request bound
        cannot hold it now; Unavailable while the worker drains."""
        if self.draining:
            raise Unavailable("decode worker is draining; it takes no new KV")
        with self._lock:
            held = len(self._inflight) + len(self._leased) + self.other_held()
            if self.max_held is not None and held >= self.max_held:
                raise ResourceExhausted(f"decode worker full: {held} requests held (bound {self.max_held})")
            used = sum(e.nbytes for e in (*self._inflight.values(), *self._leased.values())) + self.other_used()
            if used + nbytes > self.budget_bytes:
                raise ResourceExhausted(f"KV of {nbytes} bytes does not fit: {self.budget_bytes - used} of "
                                        f"{self.budget_bytes} bytes free on this decode worker")
            ticket = uuid.uuid4().hex
            stall = stall_s or self.stall_s
            self._inflight[ticket] = Entry(request_id, nbytes, time.monotonic() + stall, cancel, stall_s=stall)
            return ticket

    def touch(self, ticket: str) -> None:
        """A piece arrived: push the stall deadline out."""
        entry = self._inflight.get(ticket)
        if entry is not None:
            entry.deadline = time.monotonic() + (entry.stall_s or self.stall_s)

    def abort(self, ticket: str) -> None:
        with self._lock:
            self._inflight.pop(ticket, None)

    def commit(self, ticket: str, layers: Layers, lease_s: float = 0.0) -> tuple[str, float]:
        """The push is complete: its KV waits under a lease; returns (handle, lease seconds)."""
        lease = lease_s or self.lease_s
        with self._lock:
            entry = self._inflight.pop(ticket)
            entry.layers, entry.cancel = layers, None
            entry.n_tokens = int(layers[0][0].shape[0])
            entry.deadline = time.monotonic() + lease
            self._leased[ticket] = entry
        return ticket, lease

    def claim(self, handle: str) -> Entry:
        """Hand the KV to the caller (the decode scheduler now owns it); NotFound if unknown or expired."""
        with self._lock:
            entry = self._leased.pop(handle, None)
        if entry is None:
            raise NotFound(f"no KV under handle {handle!r} (never pushed, already decoded, or its lease expired)",
                           param="handle")
        return entry

    def release(self, handle: str) -> bool:
        with self._lock:
            return self._leased.pop(handle, None) is not None

    def reap(self) -> None:
        """Expire leases and cancel stalled pushes (the reaper thread calls this a few times a second)."""
        now = time.monotonic()
        with self._lock:
            expired = [(h, e) for h, e in self._leased.items() if e.deadline <= now]
            for h, _ in expired:
                del self._leased[h]
            stalled = [e for e in self._inflight.values() if e.deadline <= now]
        for _, e in expired:
            if self.on_expire:
                self.on_expire(e, "lease expired")
        for e in stalled:
            if self.on_expire:
                self.on_expire(e, "push stalled")
            if e.cancel is not None:
                e.cancel()  # the handler's finally aborts the ticket

    def _reap_loop(self) -> None:
        while not self._stop.wait(0.1):
            self.reap()

    def close(self) -> None:
        self._stop.set()
        with self._lock:
            self._leased.clear()
