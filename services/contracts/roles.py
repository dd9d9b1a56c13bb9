"""The roles a Tandem process plays: one owner for the names that layout pools, `tandem serve`, the registry,
the launcher, the gateway and the simulator use. Pure typing; `sim/` may import it.

`Role` is a `Literal` (not an enum) so layout YAML, JSON and log lines keep the plain strings.
"""

from __future__ import annotations

from typing import Literal, get_args

LLMRole = Literal["prefill", "decode", "mixed"]
"""Splitwise's LLM worker pools: they run the engine and serve `tandem.v1.Worker`."""
DiffusionRole = Literal["dlm", "policy"]
"""The diffusion workers: the diffusion LM and the diffusion-policy worker, each its own gRPC service."""
PoolRole = Literal[LLMRole, DiffusionRole]
"""What a layout pool may run."""
Role = Literal[LLMRole, "gateway", DiffusionRole]
"""Every service `tandem serve ROLE` starts."""

LLM_ROLES: tuple[str, ...] = get_args(LLMRole)
DIFFUSION_ROLES: tuple[str, ...] = get_args(DiffusionRole)
POOL_ROLES: tuple[str, ...] = get_args(PoolRole)
ROLES: tuple[str, ...] = get_args(Role)
GATEWAY_ROUTED_ROLES: tuple[str, ...] = (*LLM_ROLES, "dlm")
"""Roles the gateway routes requests to (policy workers are called directly)."""
PREFILL_ROLES: tuple[str, ...] = ("prefill", "mixed")
"""Roles that run prefill (a mixed worker runs both phases)."""
DECODE_ROLES: tuple[str, ...] = ("decode", "mixed")
"""Roles that run decode."""
