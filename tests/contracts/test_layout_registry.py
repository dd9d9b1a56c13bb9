"""The `registry:` layout setting: `memory` (the default) or a redis:// URL; anything else is an error that names
the field, raised by the layout loader."""

from __future__ import annotations

import pytest

from services.contracts.errors import InvalidArgument
from services.contracts.layout import load_layout, parse_layout


def test_memory_and_redis_registries_are_accepted() -> None:
    assert parse_layout({"registry": "memory"}).registry == "memory"
    assert load_layout(None).registry == "memory"
    assert parse_layout({"registry": "redis://127.0.0.1:6379/0"}).registry == "redis://127.0.0.1:6379/0"


@pytest.mark.parametrize("value", ["banana", "redis://127.0.0.1:notaport/0", "http://127.0.0.1:6379/0"])
def test_other_registries_are_a_clear_error(tmp_path, value: str) -> None:
    path = tmp_path / "layout.yaml"
    path.write_text(f"registry: {value}\npools:\n  - role: mixed\n")
    with pytest.raises(InvalidArgument) as err:
        load_layout(path)
    assert err.value.param == "registry"
    assert "registry:" in str(err.value) and "memory" in str(err.value) and value in str(err.value)
