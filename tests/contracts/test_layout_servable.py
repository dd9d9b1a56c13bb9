"""A layout setting only the simulator can honour is refused, naming the field, wherever the runtime would serve
or deploy the layout: the gateway, `tandem up`'s plan, `tandem compose`, `tandem k8s`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from services.contracts.errors import InvalidArgument
from services.contracts.layout import parse_layout

SPLIT = {"pools": [{"role": "prefill", "count": 1}, {"role": "decode", "count": 2}]}
FALLBACK = {**SPLIT, "router": {"mixed_fallback": True}}


def test_mixed_fallback_is_refused_where_the_layout_is_served() -> None:
    from services.cluster.compose import render
    from services.cluster.k8s import manifests
    from services.cluster.launcher import plan
    from services.gateway.server import build_gateway

    layout = parse_layout(FALLBACK)
    for serve in (lambda: build_gateway(layout, tokenizer=object()), lambda: plan(layout, None),
                  lambda: render(layout), lambda: manifests(layout)):
        with pytest.raises(InvalidArgument, match="router.mixed_fallback: the runtime never runs a prompt") as e:
            serve()
        assert e.value.param == "router.mixed_fallback"
    # the default (what the runtime does) is servable, and so is the flag with nothing to fall back to
    assert parse_layout(SPLIT).router.mixed_fallback is False
    for ok in (SPLIT, {"pools": [{"role": "mixed", "count": 2}], "router": {"mixed_fallback": True}}):
        assert len(plan(parse_layout(ok), None)) == sum(p["count"] for p in ok["pools"]) + 1


def test_tandem_compose_names_the_field_without_a_traceback(tmp_path: Path) -> None:
    path = tmp_path / "fallback.yaml"
    path.write_text(yaml.safe_dump(FALLBACK))
    res = subprocess.run([sys.executable, "-m", "services.cli", "compose", str(path)], capture_output=True,
                         text=True, timeout=120)
    assert res.returncode != 0 and "router.mixed_fallback" in res.stdout + res.stderr
    assert "Traceback" not in res.stderr
