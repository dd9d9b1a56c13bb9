"""Open the registry a layout names, for each side: the gateway's view, a worker's heartbeat."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from services.contracts.errors import InvalidArgument
from services.contracts.layout import Layout
from services.contracts.registry_url import parse_registry
from services.contracts.roles import LLM_ROLES
from services.registry import StaticRegistry
from services.registry.live import Heartbeat, LiveRegistry, MemoryRegistry, Poller, WorkerRecord

POLL_S = 0.25  # the embedded registry asks each worker for its load this often


def gateway_registry(layout: Layout, info: Callable[[str, float], Any], workers: Sequence[str] = ()) -> LiveRegistry:
    """The gateway's view of the workers.

    `memory`: the layout's workers (or `workers`, ROLE=HOST:PORT), polled in the background with
    `info(address, timeout)` (a WorkerInfo, or an error).
    `redis://`: whatever registered in Redis; `workers` may then only name dlm workers (they do not heartbeat).
    """
    spec = parse_registry(layout.registry)
    static = StaticRegistry.from_pairs(workers) if workers else StaticRegistry.from_layout(layout)
    fixed = [e for e in static.all() if e.role not in LLM_ROLES]
    if spec.kind == "redis":
        if any(e.role in LLM_ROLES for e in StaticRegistry.from_pairs(workers).all()):
            raise InvalidArgument("worker: with a redis registry the LLM workers register themselves; "
                                  "--worker may only name dlm workers", param="worker")
        from services.registry.redis_store import RedisRegistry

        return RedisRegistry(spec, fixed).watch()
    registry = MemoryRegistry(spec.ttl_s, fixed)
    Poller(registry, [e for e in static.all() if e.role in LLM_ROLES], info, POLL_S).start()
    return registry


def worker_heartbeat(registry: str, record: Callable[[], WorkerRecord]) -> Heartbeat | None:
    """Start a worker's heartbeat into the layout's registry; None for `memory` (the gateway polls instead)."""
    spec = parse_registry(registry)
    if spec.kind != "redis":
        return None
    from services.registry.redis_store import RedisRegistry

    return Heartbeat(RedisRegistry(spec), record).start()
