"""The gateway's front-door bound: at most `limit` requests in flight; the rest get 429 (or 503 while draining)
at once, before their body is read or tokenized. A stream-stall watchdog for the decode streams lives here too.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from services.contracts.errors import ResourceExhausted, Unavailable

RETRY_AFTER_S = 1.0  # the hint a refused client gets (HTTP Retry-After, gRPC `retry-after` trailer)


class Ticket:
    """One admitted request's place; `release()` is idempotent, so every exit path may call it. Whoever runs
    the request marks it `handed_over` and gives it back when the run ends; else the front door does."""

    __slots__ = ("_admission", "_done", "handed_over")

    def __init__(self, admission: Admission) -> None:
        self._admission, self._done, self.handed_over = admission, False, False

    def release(self) -> None:
        if not self._done:
            self._done = True
            self._admission._leave()


class Admission:
    """A counting bound with a drain switch. `enter()` never blocks: a full gateway answers now, not later."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.inflight = 0
        self.draining = False
        self.refused = 0
        self._cv = threading.Condition()

    def enter(self) -> Ticket:
        with self._cv:
            if self.draining:
                raise Unavailable("the gateway is draining (shutting down); send new requests elsewhere")
            if self.inflight >= self.limit:
                self.refused += 1
                raise ResourceExhausted(f"the gateway is full: {self.inflight} requests in flight (max_inflight "
                                        f"{self.limit}); retry after {RETRY_AFTER_S:.0f}s", retry_after_s=RETRY_AFTER_S)
            self.inflight += 1
            return Ticket(self)

    def _leave(self) -> None:
        with self._cv:
            self.inflight -= 1
            self._cv.notify_all()

    def drain(self, grace_s: float) -> bool:
        """Refuse new requests; wait up to `grace_s` for those in flight. True when none is left."""
        deadline = time.monotonic() + grace_s
        with self._cv:
            self.draining = True
            while self.inflight and (left := deadline - time.monotonic()) > 0:
                self._cv.wait(left)
            return self.inflight == 0


class Watch:
    """One watched call. A stream `kick()`s on every token; a call with nothing to kick (a prefill) is judged by
    `beat()`, the worker's last heartbeat (None: no source of heartbeats, so never judged). The watchdog calls
    `on_stall` once when neither moved for `stall_s`; `bind(cancel)` sets it once the call exists."""

    __slots__ = ("last", "on_stall", "fired", "beat", "closed", "_lock")

    def __init__(self, on_stall: Callable[[], None] | None = None,
                 beat: Callable[[], float | None] | None = None) -> None:
        self.last, self.on_stall, self.fired, self.beat = time.monotonic(), on_stall, False, beat
        self.closed = False
        self._lock = threading.Lock()

    def kick(self) -> None:
        self.last = time.monotonic()

    def silent_s(self, now: float) -> float:
        if self.beat is None:
            return now - self.last
        b = self.beat()
        return 0.0 if b is None else now - max(self.last, b)

    def bind(self, cancel: Callable[[], None]) -> None:
        with self._lock:
            self.on_stall = cancel
            if self.fired and not self.closed:  # the verdict came before the call existed
                cancel()

    def fire(self) -> None:
        # Under the lock and never after close(): a call that finished meanwhile is not cancelled (a mixed
        # worker's prompt call goes on as its decode stream).
        with self._lock:
            if self.closed:
                return
            self.fired = True
            if self.on_stall is not None:
                self.on_stall()

    def close(self) -> None:
        with self._lock:
            self.closed = True


class Watchdog:
    """One thread checking every watched call (decode streams: a token; prompt calls: the worker's heartbeat)
    for a sign of life within `stall_s` (a hung or stopped worker)."""

    def __init__(self, stall_s: float) -> None:
        self.stall_s = stall_s
        self._watches: set[Watch] = set()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def watch(self, on_stall: Callable[[], None] | None = None,
              beat: Callable[[], float | None] | None = None) -> Watch:
        w = Watch(on_stall, beat)
        with self._lock:
            self._watches.add(w)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="gateway-stall-watchdog", daemon=True)
                self._thread.start()
        return w

    def unwatch(self, w: Watch) -> None:
        """Stop watching; once this returns, `w` never fires."""
        with self._lock:
            self._watches.discard(w)
        w.close()

    def _loop(self) -> None:
        while True:
            time.sleep(min(0.25, self.stall_s / 4))
            now = time.monotonic()
            with self._lock:
                watches = list(self._watches)
            stalled = [w for w in watches if w.silent_s(now) > self.stall_s]
            with self._lock:
                for w in stalled:
                    self._watches.discard(w)
            for w in stalled:
                w.fire()
