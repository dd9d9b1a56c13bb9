"""Generate the committed Python stubs from proto/: `python -m services.rpc.gen [--check]`.

protoc emits `from tandem.v1 import x_pb2`; we rewrite that to `services.rpc.tandem.v1` so the stubs
live inside our package. `--check` regenerates into a temp dir and fails if the committed ones differ.
"""

from __future__ import annotations

import argparse
import filecmp
import re
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROTO_DIR = ROOT / "proto"
OUT_DIR = ROOT / "services" / "rpc"
PACKAGE = "services.rpc"


def proto_files() -> list[Path]:
    return sorted((PROTO_DIR / "tandem" / "v1").glob("*.proto"))


def generate(out_dir: Path) -> list[Path]:
    from grpc_tools import protoc  # test/dev dependency only

    files = proto_files()
    target = out_dir / "tandem" / "v1"
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    if not files:
        return []
    include = Path(protoc.__file__).parent / "_proto"
    args = ["protoc", f"-I{PROTO_DIR}", f"-I{include}", f"--python_out={out_dir}", f"--pyi_out={out_dir}",
            f"--grpc_python_out={out_dir}", *[str(f.relative_to(PROTO_DIR)) for f in files]]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    written = []
    for pkg in (out_dir / "tandem", target):
        (pkg / "__init__.py").write_text("")
    for path in sorted(target.glob("*.py*")):
        text = path.read_text()
        text = re.sub(r"^from tandem\.v1 import", f"from {PACKAGE}.tandem.v1 import", text, flags=re.M)
        text = re.sub(r"^import tandem\.v1\.", f"import {PACKAGE}.tandem.v1.", text, flags=re.M)
        path.write_text(text)
        written.append(path)
    return written


def check() -> list[str]:
    """Names of stub files that differ from a fresh generation (empty when up to date)."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp))
        stale = []
        names = {p.name for p in fresh} | {p.name for p in (OUT_DIR / "tandem" / "v1").glob("*.py*")}
        for name in sorted(names - {"__init__.py"}):
            a, b = Path(tmp) / "tandem" / "v1" / name, OUT_DIR / "tandem" / "v1" / name
            if not (a.exists() and b.exists() and filecmp.cmp(a, b, shallow=False)):
                stale.append(name)
        return stale


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if the committed stubs are stale")
    args = parser.parse_args()
    if args.check:
        stale = check()
        if stale:
            sys.exit("stale stubs (run `python -m services.rpc.gen`): " + ", ".join(stale))
        print("stubs up to date")
        return
    for path in generate(OUT_DIR):
        print(path.relative_to(ROOT))


if __name__ == "__main__":
    main()
