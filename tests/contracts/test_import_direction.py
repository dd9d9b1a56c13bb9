"""The direction of imports: serving code never pulls in bench/train/plot code, contracts and sim stay torch-free and
take from services only services.contracts. Checked statically (every import in every file, function-local ones too)
and in a fresh process (what importing each module actually loads); each rule also runs on a fake tree that breaks it."""

from __future__ import annotations

from pathlib import Path

import pytest
from kit.imports import NOT_SERVING, SERVING, fresh_violations, violations

REPO = Path(__file__).resolve().parents[2]

# A fake repository: every rule is broken once, in each way an import can be written; the `ok_*` files break nothing.
FAKE = {
    "torch/__init__.py": "",
    "matplotlib/__init__.py": "",
    "matplotlib/pyplot.py": "",
    "services/__init__.py": "",
    "services/cli.py": "import torch\n",
    "services/bench/__init__.py": "",
    "services/bench/stats.py": "import matplotlib.pyplot\n\ndef wilson():\n    return 0\n",
    "services/bench/cli.py": "import services.train.dlm\n",
    "services/train/__init__.py": "",
    "services/train/dlm.py": "import torch\n",
    "services/engine/__init__.py": "",
    "services/engine/cli.py": "from services.bench import stats\n",  # a CLI registration module: exempt
    "services/engine/run.py": "import json\n\n\ndef f():\n    from services.bench.stats import wilson\n",
    "services/gateway/__init__.py": "",
    "services/gateway/app.py": "import json\nimport services.train.dlm\n",
    "services/kv/__init__.py": "from ..bench.stats import wilson\n",
    "services/policy/__init__.py": "",
    "services/policy/plot.py": "import matplotlib.pyplot as plt\n",
    "services/router.py": "from services import bench\n",
    "services/contracts/__init__.py": "",
    "services/contracts/errors.py": "class InvalidArgument(ValueError):\n    pass\n",
    "services/contracts/layout.py": "from services.engine import run\n",
    "services/contracts/roles.py": "import torch\n",
    "services/contracts/ok_trace.py": "from . import errors\nfrom .errors import InvalidArgument\n",
    "sim/__init__.py": "",
    "sim/cluster.py": "from services.contracts import errors\n\n\ndef route():\n    import services.router\n",
    "sim/speed.py": "import importlib\n\nimportlib.import_module('torch')\n",
    "sim/report.py": "import matplotlib\n",  # plots are fine in the planner
    "sim/ok_search.py": "from services.contracts.errors import InvalidArgument\nfrom services import contracts\n",
}


@pytest.fixture
def fake(tmp_path: Path) -> Path:
    for rel, text in FAKE.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    return tmp_path


def test_the_real_tree_imports_in_the_allowed_directions() -> None:
    assert violations(REPO) == []


def test_a_fresh_process_loads_in_the_allowed_directions() -> None:
    assert fresh_violations(REPO) == []


def test_every_services_package_is_under_a_rule() -> None:
    """A new package under services/ must be added to SERVING (or be bench/train code), so no rule misses it."""
    known = {*SERVING, *NOT_SERVING, "services.cli", "services.__init__"}
    entries = {f"services.{p.stem}" for p in (REPO / "services").iterdir()
               if (p.suffix == ".py" or (p / "__init__.py").is_file())}
    assert entries - known == set()


def test_static_scan_catches_every_kind_of_violation(fake: Path) -> None:
    found = violations(fake)
    where = {v.split(": ", 1)[0]: v for v in found}
    assert set(where) == {
        "services/engine/run.py:5",  # function-local `from x import y`
        "services/gateway/app.py:2",  # `import x.y`
        "services/kv/__init__.py:1",  # relative import from a package's __init__
        "services/policy/plot.py:1",  # matplotlib in serving code
        "services/router.py:1",  # `from services import bench`: a package imported by name
        "services/contracts/layout.py:1",  # contracts importing a service
        "services/contracts/roles.py:1",  # contracts importing torch
        "sim/cluster.py:5",  # sim: function-local import of a service
        "sim/speed.py:3",  # sim: importlib.import_module('torch')
    }, found
    assert "imports services.bench.stats.wilson (serving code" in where["services/engine/run.py:5"]
    assert "imports services.train.dlm" in where["services/gateway/app.py:2"]
    assert "imports services.bench.stats.wilson" in where["services/kv/__init__.py:1"]
    assert "imports services.bench (serving" in where["services/router.py:1"]
    assert "imports services.engine.run (services.contracts imports outside" in where["services/contracts/layout.py:1"]
    assert "imports torch (sim imports torch" in where["sim/speed.py:3"]


def test_fresh_process_check_catches_what_imports_load(fake: Path) -> None:
    found = set(fresh_violations(fake))
    assert {
        "import services.gateway.app loads services.train (serving code imports bench/train/plot code)",
        "import services.gateway.app loads services.train.dlm (serving code imports bench/train/plot code)",
        "import services.kv loads services.bench (serving code imports bench/train/plot code)",
        "import services.kv loads services.bench.stats (serving code imports bench/train/plot code)",
        "import services.contracts.layout loads services.engine "
        "(services.contracts imports outside services.contracts)",
        "import services.contracts.roles loads torch (services.contracts imports outside services.contracts)",
        "import sim.speed loads torch (sim imports torch or a service other than services.contracts)",
        "import services.cli loads torch (the CLI loads torch before a verb runs)",
    } <= found, found
    assert not [v for v in found if "ok_" in v or "sim.report" in v or "engine.cli" in v], found
