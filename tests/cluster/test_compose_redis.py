"""`tandem compose` for a layout with a Redis registry: the file runs that Redis, workers register in it under
their service names, the gateway gets no static LLM worker list; an external Redis adds no service."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import yaml

from services.cluster.compose import compose_doc, render
from services.contracts.layout import load_layout, parse_layout

ROOT = Path(__file__).resolve().parents[2]
SCHEMA = json.loads((ROOT / "tests" / "data" / "compose-spec.json").read_text())


def redis_layout(url: str):
    doc = yaml.safe_load((ROOT / "examples" / "local-split.yaml").read_text())
    return parse_layout({**doc, "registry": url})


def test_compose_runs_the_named_redis_and_workers_register_in_it() -> None:
    lay = redis_layout("redis://redis:6379/0?ttl_s=2")
    doc = yaml.safe_load(render(lay, "x.yaml"))
    assert list(jsonschema.Draft7Validator(SCHEMA).iter_errors(doc)) == []
    svc = doc["services"]
    assert set(svc) == {"redis", "gateway", "prefill-0", "decode-0", "decode-1"}
    assert svc["redis"]["command"][:3] == ["redis-server", "--port", "6379"]
    assert svc["redis"]["healthcheck"]["test"][:2] == ["CMD", "redis-cli"]
    d1 = svc["decode-1"]
    assert d1["command"][-2:] == ["--advertise", "decode-1:50201"]
    assert d1["depends_on"] == {"redis": {"condition": "service_healthy"}}
    gw = svc["gateway"]
    assert "--worker" not in gw["command"] and "redis" in gw["depends_on"]
    # the registry setting travels in the inline layout every container reads
    assert parse_layout(yaml.safe_load(doc["configs"]["layout"]["content"])).registry == "redis://redis:6379/0?ttl_s=2"


def test_external_redis_adds_no_service_and_memory_is_unchanged() -> None:
    doc = compose_doc(redis_layout("redis://10.0.0.7:6380/1"))
    assert "redis" not in doc["services"] and "--worker" not in doc["services"]["gateway"]["command"]
    plain = compose_doc(load_layout(ROOT / "examples" / "local-split.yaml"))
    assert "redis" not in plain["services"] and "--advertise" not in plain["services"]["decode-0"]["command"]
