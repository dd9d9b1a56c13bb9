"""The allowed directions of imports, checked two ways over a source tree `root` (the repository, or a fake one):

- statically: every .py file under services/ and sim/ is parsed; every `import x`, `from x import y` (relative ones
  resolved), and `importlib.import_module("x")` / `__import__("x")` with a literal name counts, at any depth
  (function-local imports included);
- in a fresh process: `python -c` imports the modules with `root` first on the path and inspects `sys.modules`.

The rules (docs/architecture.md draws them):
- a serving package never imports services.bench, services.train or matplotlib;
- services.contracts imports nothing from services but services.contracts, and never torch;
- sim imports nothing from services but services.contracts, and never torch;
- CLI registration modules (services/cli.py, services/<area>/cli.py, services/bench/*_cli.py, services/train/cli*.py)
  may register bench/train verbs, but importing services.cli never loads torch (the verbs import lazily).
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

SERVING = ("services.engine", "services.kv", "services.batching", "services.workers", "services.gateway",
           "services.cluster", "services.dlm", "services.policy", "services.rpc", "services.contracts",
           "services.router", "services.registry", "services.grpcutil")
NOT_SERVING = ("services.bench", "services.train", "matplotlib")
CONTRACTS = "services.contracts"


def under(name: str, *prefixes: str) -> bool:
    """`name` is one of `prefixes` or a module inside one of them."""
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def is_cli(module: str) -> bool:
    """A CLI registration module: exempt from the serving rule (its verbs import bench/train code lazily)."""
    stem = module.rsplit(".", 1)[-1]
    return stem == "cli" or stem.endswith("_cli") or stem.startswith("cli_")


def _outside_contracts(target: str) -> bool:
    return target == "torch" or target.startswith("torch.") or (
        target.startswith("services.") and not under(target, CONTRACTS))


@dataclass(frozen=True)
class Rule:
    name: str
    applies: Callable[[str], bool]  # to the importing module
    forbidden: Callable[[str], bool]  # the imported name


RULES = (
    Rule("serving code imports bench/train/plot code",
         lambda m: under(m, *SERVING) and not is_cli(m), lambda t: under(t, *NOT_SERVING)),
    Rule("services.contracts imports outside services.contracts",
         lambda m: under(m, CONTRACTS), _outside_contracts),
    Rule("sim imports torch or a service other than services.contracts",
         lambda m: under(m, "sim"), _outside_contracts),
)


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported(tree: ast.AST, module: str, is_package: bool) -> Iterator[tuple[int, str]]:
    """(line, dotted name) for every import in `tree`; `from x import a` yields `x.a` (a module or a name in x)."""
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                yield node.lineno, base if alias.name == "*" else f"{base}.{alias.name}"
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            f = node.func
            if (isinstance(f, ast.Attribute) and f.attr == "import_module") or \
                    (isinstance(f, ast.Name) and f.id in ("import_module", "__import__")):
                yield node.lineno, node.args[0].value


def violations(root: str | Path) -> list[str]:
    """Static scan of root/services and root/sim: one 'path:line: module imports target (rule)' per violation."""
    root = Path(root)
    out = []
    for top in ("services", "sim"):
        for path in sorted((root / top).rglob("*.py")):
            module = module_name(root, path)
            rules = [r for r in RULES if r.applies(module)]
            if not rules:
                continue
            tree = ast.parse(path.read_text(), filename=str(path))
            for line, target in imported(tree, module, path.name == "__init__.py"):
                out += [f"{path.relative_to(root)}:{line}: {module} imports {target} ({r.name})"
                        for r in rules if r.forbidden(target)]
    return out


def modules(root: Path, prefixes: tuple[str, ...]) -> list[str]:
    """The importable modules under `prefixes` (packages or single modules) in `root`, CLI modules and generated
    gRPC stubs' `*_pb2*` aside (they import only grpc/protobuf and each other)."""
    names = []
    for prefix in prefixes:
        base = root.joinpath(*prefix.split("."))
        files = [base.with_suffix(".py")] if base.with_suffix(".py").is_file() else sorted(base.rglob("*.py"))
        names += [m for m in (module_name(root, f) for f in files) if not is_cli(m) and "_pb2" not in m]
    return names


_PROBE = """
import importlib, json, sys
report = {}
OPTIONAL = {"triton"}
for name in json.loads(sys.argv[1]):
    before = set(sys.modules)
    try:
        importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name not in OPTIONAL:  # a GPU-only extra (triton) may be absent; the AST scan still covers it
            raise
    report[name] = sorted(set(sys.modules) - before)
print(json.dumps(report))
"""


def fresh_loaded(root: Path, names: list[str]) -> dict[str, list[str]]:
    """Import `names` one by one in a fresh interpreter with `root` first on the path: what each newly loaded."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    p = subprocess.run([sys.executable, "-c", _PROBE, json.dumps(names)], cwd=root, env=env, capture_output=True,
                       text=True, timeout=300)
    if p.returncode != 0:
        raise RuntimeError(f"importing {names} failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.splitlines()[-1])


def fresh_violations(root: str | Path) -> list[str]:
    """The same rules over what a fresh process actually loads, plus: importing services.cli loads no torch.
    A violation names the first module whose import loaded the forbidden one."""
    root = Path(root)
    out = []
    for rule, prefixes in ((RULES[0], SERVING), (RULES[1], (CONTRACTS,)), (RULES[2], ("sim",))):
        names = [m for m in modules(root, prefixes) if rule.applies(m)]
        for name, loaded in fresh_loaded(root, names).items():
            out += [f"import {name} loads {m} ({rule.name})" for m in loaded if rule.forbidden(m)]
    if (root / "services" / "cli.py").is_file():
        loaded = fresh_loaded(root, ["services.cli"])["services.cli"]
        out += [f"import services.cli loads {m} (the CLI loads torch before a verb runs)"
                for m in loaded if m == "torch"]
    return out
