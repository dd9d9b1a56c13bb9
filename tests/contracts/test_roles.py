"""One owner for role names (services.contracts.roles): the layout, the registry and `tandem serve` agree with it."""

from __future__ import annotations

from typing import get_args

from services.contracts import roles
from services.contracts.layout import Pool


def test_layout_pools_take_exactly_the_pool_roles() -> None:
    assert get_args(Pool.model_fields["role"].annotation) == roles.POOL_ROLES
    assert roles.POOL_ROLES == (*roles.LLM_ROLES, *roles.DIFFUSION_ROLES)
    assert set(roles.ROLES) == {*roles.POOL_ROLES, "gateway"}


def test_every_pool_role_has_a_default_port_and_serve_accepts_every_role() -> None:
    from services.cluster import cli
    from services.registry import DEFAULT_BASE_PORT

    assert set(DEFAULT_BASE_PORT) == set(roles.POOL_ROLES)
    assert cli.ROLES is roles.ROLES
