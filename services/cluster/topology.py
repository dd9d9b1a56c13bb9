"""A layout's deployable shape, shared by `tandem compose` and `tandem k8s`: its pools, ports and drain timings."""

from __future__ import annotations

import math
from dataclasses import dataclass

from services.contracts.errors import InvalidArgument
from services.contracts.layout import Batching, Layout, Pool, parse_device
from services.contracts.roles import POOL_ROLES
from services.registry import METRICS_PORT_OFFSET, layout_endpoints

DEFAULT_DRAIN_S = 30.0  # how long a stopping service may finish in-flight requests (layout gateway.drain_s)
STOP_MARGIN_S = 10  # grace beyond the drain before the orchestrator SIGKILLs
PRESTOP_S = 5  # k8s: seconds a pod keeps serving after it leaves its Service's endpoints, before SIGTERM
CPU_HARDWARE = "cpu"


@dataclass(frozen=True, slots=True)
class PoolSpec:
    """One pool as deployed: `name` is unique per layout (the role, or role-hardware when a role has several)."""

    name: str
    role: str
    count: int
    port: int  # the first instance's gRPC port (k8s: every replica's)
    hardware: str
    batching: Batching
    power_cap_w: float | None
    device: str | None = None  # 'cpu' or 'cuda' (every replica alike; a pod's GPU is the device plugin's pick)

    @property
    def metrics_port(self) -> int:
        return self.port + METRICS_PORT_OFFSET

    @property
    def gpu(self) -> bool:
        """A GPU pod: the pool's device says cuda, or (no device) its hardware is not the CPU."""
        return self.device == "cuda" if self.device is not None else self.hardware != CPU_HARDWARE


def pools(layout: Layout) -> list[PoolSpec]:
    """The layout's pools with count > 0, in layout order, ports as `tandem up` assigns them."""
    first_port: dict[tuple[str, int], int] = {}
    for ep in layout_endpoints(layout):
        first_port.setdefault((ep.role, ep.index), ep.port)
    live = [p for p in layout.pools if p.count > 0]
    out, seen = [], dict.fromkeys(POOL_ROLES, 0)
    for pool in live:
        same = [q for q in live if q.role == pool.role]
        name = pool.role
        if len(same) > 1:
            distinct = len({q.hardware for q in same}) == len(same)
            name = f"{pool.role}-{slug(pool.hardware) if distinct else same.index(pool)}"
        out.append(PoolSpec(name, pool.role, pool.count, first_port[(pool.role, seen[pool.role])], pool.hardware,
                            pool.batching or layout.batching, pool.power_cap_w, _one_kind(layout, pool)))
        seen[pool.role] += pool.count
    return out


def _one_kind(layout: Layout, pool: Pool) -> str | None:
    """The pool's device kind for replicas that are all alike; InvalidArgument for a per-instance mix."""
    if pool.device is None:
        return None
    kinds = {parse_device(d)[0] for d in (pool.device if isinstance(pool.device, list) else [pool.device])}
    if len(kinds) > 1:
        pi = layout.pools.index(pool)
        raise InvalidArgument(f"pools.{pi}.device: a Deployment's replicas run alike, so a pool cannot mix "
                              f"{' and '.join(sorted(kinds))}; split it into one pool per device", param=f"pools.{pi}.device")
    return kinds.pop()


def heterogeneous(layout: Layout) -> bool:
    """Pools on more than one kind of machine, or on anything but CPUs: they need node placement."""
    kinds = {p.hardware for p in layout.pools if p.count > 0}
    return len(kinds) > 1 or kinds != {CPU_HARDWARE}


def drain_s(layout: Layout) -> float:
    return float(getattr(layout.gateway, "drain_s", DEFAULT_DRAIN_S))


def stop_grace_s(layout: Layout) -> int:
    """Seconds between SIGTERM and SIGKILL: the drain plus a margin."""
    return math.ceil(drain_s(layout)) + STOP_MARGIN_S


def port_of(addr: str) -> int:
    return int(addr.rsplit(":", 1)[1])


def slug(name: str) -> str:
    """A DNS-label-safe form of a name."""
    out = "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")
    return out or "cluster"
