"""`tandem compose`: the committed compose.yaml is fresh and valid against the official Compose JSON schema;
`tandem up`'s process plan and `tandem serve` argument errors."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml
from kit.compose import validate

from services.cluster.compose import compose_doc, render
from services.cluster.launcher import plan
from services.contracts.layout import Layout, load_layout, parse_layout

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = "examples/local-split.yaml"


def test_committed_compose_is_fresh_and_valid() -> None:
    committed = (ROOT / "compose.yaml").read_text()
    assert committed == render(load_layout(ROOT / EXAMPLE), EXAMPLE), "regenerate: tandem compose " + EXAMPLE
    doc = yaml.safe_load(committed)
    assert validate(doc) == []
    assert set(doc["services"]) == {"gateway", "prefill-0", "decode-0", "decode-1"}
    gw = doc["services"]["gateway"]
    assert gw["ports"] == ["127.0.0.1:8000:8000", "127.0.0.1:50051:50051"]
    assert set(gw["depends_on"]) == {"prefill-0", "decode-0", "decode-1"}
    assert gw["command"][-6:] == ["--worker", "prefill=prefill-0:50100", "--worker", "decode=decode-0:50200",
                                  "--worker", "decode=decode-1:50201"]
    # the layout travels inline and parses back to the same layout
    assert parse_layout(yaml.safe_load(doc["configs"]["layout"]["content"])) == load_layout(ROOT / EXAMPLE)


def test_schema_validator_is_real() -> None:
    doc = compose_doc(Layout())
    assert validate(doc) == []
    doc["services"]["gateway"]["depends_on"] = {"mixed-0": {"condition": "service_sleeping"}}
    doc["services"]["mixed-0"]["restart_policy"] = "sometimes"  # not a Compose key
    errors = validate(doc)
    assert any("depends_on" in e for e in errors) and any("restart_policy" in e for e in errors)


def test_up_plan_for_default_and_local_split() -> None:
    default = plan(Layout(), None)
    assert [s.name for s in default] == ["mixed-0", "gateway"]
    assert default[1].http == "http://127.0.0.1:8000/health"
    split = plan(load_layout(ROOT / EXAMPLE), EXAMPLE)
    assert [s.name for s in split] == ["prefill-0", "decode-0", "decode-1", "gateway"]
    assert [s.grpc for s in split[:3]] == ["127.0.0.1:50100", "127.0.0.1:50200", "127.0.0.1:50201"]
    gw = split[-1].argv
    assert gw[gw.index("--http") + 1] == "127.0.0.1:8000" and gw[gw.index("--grpc") + 1] == "127.0.0.1:50051"
    assert split[1].argv[-4:] == ["--index", "0", "--address", "127.0.0.1:50200"]


@pytest.mark.parametrize("args, needle", [
    (["serve", "wizard"], "role"),
    (["up", "no/such/layout.yaml"], "layout file not found"),
    (["compose", "no/such/layout.yaml"], "layout file not found"),
])
def test_cli_errors_are_clear(args: list[str], needle: str, monkeypatch: pytest.MonkeyPatch,
                              capsys: pytest.CaptureFixture) -> None:
    from services import cli

    monkeypatch.setattr(sys, "argv", ["tandem", *args])
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "error:" in err and needle in err and "Traceback" not in err
