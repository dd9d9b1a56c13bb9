"""The `tandem` entry point: every area registers, and starting the CLI does not load torch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from services.cli import app

ROOT = Path(__file__).resolve().parents[2]


def test_cli_import_does_not_load_torch() -> None:
    code = "import sys, services.cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "False"


def test_every_area_registers_its_verbs() -> None:
    out = subprocess.run([sys.executable, "-m", "services.cli", "bench", "--help"], capture_output=True, text=True,
                         check=True).stdout
    for verb in ("kv", "fusion", "dlm", "policy", "engine", "sim"):
        assert verb in out, f"tandem bench {verb} missing"
    top = subprocess.run([sys.executable, "-m", "services.cli", "--help"], capture_output=True, text=True,
                         check=True).stdout
    for verb in ("generate", "up", "serve", "compose", "sim", "dlm", "policy", "fusion"):
        assert verb in top, f"tandem {verb} missing"


def test_unknown_verb_is_a_clear_error() -> None:
    res = subprocess.run([sys.executable, "-m", "services.cli", "frobnicate"], capture_output=True, text=True)
    assert res.returncode != 0
    assert "Traceback" not in res.stderr and "frobnicate" in res.stderr


def _command(path: str):
    cmd = typer.main.get_command(app)
    for verb in path.split():
        cmd = cmd.commands[verb]
    return cmd


@pytest.mark.parametrize("path, canonical, old", [
    ("sim run", "--json", "--out"),
    ("sim search", "--json", "--out"),
    ("bench dlm", "--checkpoint", "--ckpt"),
    ("dlm evaluate", "--json", "--out"),
    ("dlm evaluate", "--checkpoint", "--ckpt"),
    ("dlm profile", "--json", "--out"),
    ("policy plots", "--out-dir", "--out"),
])
def test_old_flag_spellings_are_hidden_aliases(path: str, canonical: str, old: str) -> None:
    """One name per meaning in --help; the old spelling still parses."""
    params = {o: p for p in _command(path).params for o in p.opts}
    assert not params[canonical].hidden and params[old].hidden
    assert params[canonical].name != params[old].name  # the verb folds the alias into the canonical value


def test_sim_run_old_out_flag_still_writes_the_same_json(tmp_path: Path) -> None:
    args = ["sim", "run", str(ROOT / "examples/local-dlm.yaml"), "--trace", "fixed:64:8", "--rate", "2",
            "--duration", "5"]
    runner = CliRunner()
    assert runner.invoke(app, [*args, "--json", str(tmp_path / "a.json")]).exit_code == 0
    assert runner.invoke(app, [*args, "--out", str(tmp_path / "b.json")]).exit_code == 0
    a, b = (json.loads((tmp_path / f).read_text()) for f in ("a.json", "b.json"))
    assert a == b
