"""Where the workers are: the Registry interface and the static one derived from a layout.

The live registries (heartbeats with load: in-process or Redis) are `services.registry.live` and
`services.registry.redis_store`; `services.registry.connect` opens the one a layout names.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from services.contracts.errors import InvalidArgument
from services.contracts.layout import Layout
from services.contracts.roles import GATEWAY_ROUTED_ROLES, PoolRole

# Default gRPC base port per role when a pool sets no base_port; instance i listens on base + i.
DEFAULT_BASE_PORT: dict[str, int] = {"prefill": 50100, "decode": 50200, "mixed": 50300, "dlm": 50400, "policy": 50500}
METRICS_PORT_OFFSET = 1000  # a worker's Prometheus port is its gRPC port + this


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One service instance: `address` is its gRPC host:port, `bind` what it listens on."""

    role: str
    index: int
    address: str
    metrics_port: int | None = None
    bind: str | None = None

    @property
    def name(self) -> str:
        return f"{self.role}-{self.index}"

    @property
    def port(self) -> int:
        return int(self.address.rsplit(":", 1)[1])


class Registry(Protocol):
    """What the router needs to know about the cluster: the workers of each role (live ones, for a live registry)."""

    def endpoints(self, role: str) -> list[Endpoint]: ...

    def all(self) -> list[Endpoint]: ...

    def close(self) -> None: ...


class StaticRegistry:
    """A fixed list of endpoints (from a layout, or given explicitly)."""

    def __init__(self, endpoints: Iterable[Endpoint]) -> None:
        self._endpoints = list(endpoints)
        seen: set[str] = set()
        for ep in self._endpoints:
            if ep.address in seen:
                raise InvalidArgument(f"two workers share the address {ep.address}", param="pools")
            seen.add(ep.address)

    def endpoints(self, role: str) -> list[Endpoint]:
        return [e for e in self._endpoints if e.role == role]

    def all(self) -> list[Endpoint]:
        return list(self._endpoints)

    def close(self) -> None:
        pass

    @classmethod
    def from_layout(cls, layout: Layout) -> StaticRegistry:
        return cls(layout_endpoints(layout))

    @classmethod
    def from_pairs(cls, pairs: Iterable[str]) -> StaticRegistry:
        """`ROLE=HOST:PORT` strings (the gateway's `--worker` flags in containers); ROLE may also be `dlm`."""
        eps: list[Endpoint] = []
        for pair in pairs:
            role, sep, addr = pair.partition("=")
            if not sep or role not in GATEWAY_ROUTED_ROLES or ":" not in addr:
                raise InvalidArgument(f"worker: expected ROLE=HOST:PORT with ROLE in {GATEWAY_ROUTED_ROLES}, got {pair!r}",
                                      param="worker")
            eps.append(Endpoint(role, sum(e.role == role for e in eps), addr))
        return cls(eps)


def layout_endpoints(layout: Layout, roles: Iterable[PoolRole] | None = None) -> list[Endpoint]:
    """Every instance the layout asks for, in a stable order, with its gRPC and metrics ports."""
    wanted = set(roles) if roles is not None else None
    out: list[Endpoint] = []
    next_index: dict[str, int] = {}
    next_port: dict[str, int] = {}
    for pool in layout.pools:
        if pool.count == 0 or (wanted is not None and pool.role not in wanted):
            continue
        base = pool.base_port if pool.base_port is not None else next_port.get(pool.role, DEFAULT_BASE_PORT[pool.role])
        for i in range(pool.count):
            port = base + i
            if port > 65535 - METRICS_PORT_OFFSET:
                raise InvalidArgument(f"pools: port {port} of role {pool.role} leaves no room for its metrics port",
                                      param="pools.base_port")
            index = next_index.get(pool.role, 0)
            next_index[pool.role] = index + 1
            out.append(Endpoint(pool.role, index, f"{pool.host}:{port}", port + METRICS_PORT_OFFSET,
                                bind=f"{pool.host}:{port}"))
        next_port[pool.role] = base + pool.count
    return out
