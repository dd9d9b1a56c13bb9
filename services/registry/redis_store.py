"""The Redis registry: each worker's record is one key with a TTL (`tandem:worker:<address>`), rewritten by its
Heartbeat; the gateway reads every record back in the background, so a pick never waits on Redis.

Losing Redis (paused, killed) loses no routing: the view stops expiring and the router goes on with the last
known workers; once Redis answers again, every record gets one TTL of grace to be re-written by its worker.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable

import redis

from services.contracts.registry_url import RegistrySpec, parse_registry
from services.grpcutil import log
from services.registry import Endpoint
from services.registry.live import LiveRegistry, WorkerRecord, logger

PREFIX = "tandem:worker:"
GONE = b"gone"  # a deregistered worker's key holds this for one TTL, so readers drop it at once
IO_TIMEOUT_S = 1.0  # a paused Redis costs a heartbeat or a refresh this long (their own threads), never a request


def connect(spec: RegistrySpec) -> redis.Redis:
    return redis.Redis.from_url(spec.url, socket_timeout=IO_TIMEOUT_S, socket_connect_timeout=IO_TIMEOUT_S)


class RedisRegistry(LiveRegistry):
    """Both sides: workers call `heartbeat`/`deregister`; the gateway calls `watch()` and reads the view."""

    def __init__(self, url: str | RegistrySpec, fixed: Iterable[Endpoint] = (), refresh_s: float | None = None,
                 ttl_s: float | None = None) -> None:
        self.spec = url if isinstance(url, RegistrySpec) else parse_registry(url)
        if self.spec.kind != "redis":
            raise ValueError(f"not a redis URL: {url!r}")
        super().__init__(ttl_s or self.spec.ttl_s, fixed)
        self.client = connect(self.spec)
        self.refresh_s = refresh_s or min(0.5, self.ttl_s / 4)
        self.reachable = True
        self.outages = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- the worker's side --------------------------------------------------------------------------------------
    def heartbeat(self, record: WorkerRecord) -> None:
        self.client.set(PREFIX + record.address, record.to_json(), px=int(self.ttl_s * 1000))

    register = heartbeat

    def deregister(self, address: str) -> None:
        self.client.set(PREFIX + address, GONE, px=int(self.ttl_s * 1000))

    # -- the gateway's side -------------------------------------------------------------------------------------
    def _expires(self) -> bool:
        return self.reachable

    def refresh(self) -> bool:
        """Read every record; False (and the view frozen) if Redis does not answer."""
        try:
            keys = list(self.client.scan_iter(match=PREFIX + "*", count=1000))
            pipe = self.client.pipeline(transaction=False)
            for k in keys:
                pipe.get(k)
                pipe.pttl(k)
            values = pipe.execute() if keys else []
        except (redis.RedisError, OSError) as exc:
            if self.reachable:
                self.reachable = False
                self.outages += 1
                log(logger, "registry unreachable; routing on the last known view", url=self.spec.url,
                    workers=len(self._records), error=str(exc) or type(exc).__name__)
            return False
        now = time.monotonic()
        if not self.reachable:  # back: give every known worker one TTL to re-register before it can lapse
            with self._lock:
                for addr, (rec, deadline) in self._records.items():
                    self._records[addr] = (rec, max(deadline, now + self.ttl_s))
                    self._beats[addr] = now  # silence while Redis was lost is not the worker's
            self.reachable = True
            log(logger, "registry reachable again", url=self.spec.url)
        for key, value, pttl in zip(keys, values[0::2], values[1::2], strict=True):
            address = key.decode()[len(PREFIX):]
            if value is None:
                continue
            if value == GONE:
                self._drop(address)
            elif pttl is not None and pttl > 0:
                self._put(WorkerRecord.from_json(value), now + pttl / 1000)
        return True

    def watch(self) -> RedisRegistry:
        """Read once now, then every `refresh_s` in the background until close()."""
        self.refresh()
        self._thread = threading.Thread(target=self._run, name="registry-watch", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.refresh_s):
            self.refresh()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2.0)
        self.client.close()
