"""The `tandem` entry point: every area registers, and starting the CLI does not load torch."""

from __future__ import annotations

import subprocess
import sys


def test_cli_import_does_not_load_torch() -> None:
    code = "import sys, services.cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "False"


def test_every_area_registers_its_verbs() -> None:
    out = subprocess.run([sys.executable, "-m", "services.cli", "bench", "--help"], capture_output=True, text=True,
                         check=True).stdout
    for verb in ("kv", "fusion", "dlm", "policy", "engine"):
        assert verb in out, f"tandem bench {verb} missing"
    top = subprocess.run([sys.executable, "-m", "services.cli", "--help"], capture_output=True, text=True,
                         check=True).stdout
    for verb in ("generate", "up", "serve", "compose", "sim"):
        assert verb in top, f"tandem {verb} missing"


def test_unknown_verb_is_a_clear_error() -> None:
    res = subprocess.run([sys.executable, "-m", "services.cli", "frobnicate"], capture_output=True, text=True)
    assert res.returncode != 0
    assert "Traceback" not in res.stderr and "frobnicate" in res.stderr
