"""Worker parts in one process: model specs (the decode worker's KV store is tested in tests/kv/test_kv_store.py)."""

from __future__ import annotations

import pytest

from services.contracts.errors import InvalidArgument
from services.workers.modelspec import load_model, random_spec


def test_model_specs() -> None:
    a, b = load_model("random:tiny"), load_model(random_spec(**{**_tiny(), "seed": 0}))
    assert a.fingerprint == b.fingerprint  # the same spec in two processes gives the same cache layout
    assert load_model(random_spec(**{**_tiny(), "seed": 1})).fingerprint != a.fingerprint
    for bad, match in (("random:nope", "random:tiny"), ('random:[1]', "object"), ('random:{"dim": 4}', "model spec")):
        with pytest.raises(InvalidArgument, match=match):
            load_model(bad)


def _tiny() -> dict:
    from services.workers.modelspec import TINY

    return dict(TINY)
