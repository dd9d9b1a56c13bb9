"""Print the `podman build -v` flags that give a build this machine's pip setup: one pip.conf holding the
effective configuration (files and PIP_* variables), every local path it names, and the CA bundle.

Package traffic here goes through a TLS-intercepting proxy whose CA is in the host's bundle only; local
wheel directories and indexes are named by path. Usage: python3 .ci/pip_mounts.py OUT_DIR
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

CA_DEFAULT = "/etc/ssl/certs/ca-certificates.crt"


def effective_config() -> dict[str, str]:
    out = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
    conf: dict[str, str] = {}
    for line in out.splitlines():
        key, sep, value = line.partition("=")
        if sep and "." in key:
            conf[key.split(".", 1)[1]] = ast.literal_eval(value) if value[:1] in "'\"" else value
    for key, value in os.environ.items():  # PIP_* variables win over files, as in pip itself
        if key.startswith("PIP_") and key != "PIP_CONFIG_FILE":
            conf[key[4:].lower().replace("_", "-")] = value
    return conf


def local_paths(conf: dict[str, str]) -> set[str]:
    paths = set()
    for value in conf.values():
        for token in str(value).split():
            path = token.removeprefix("file://").rstrip("/")
            if token.startswith("file://") and path.endswith("/simple"):
                path = os.path.dirname(path)  # a local index links to files beside it (../files/...)
            if path.startswith("/") and os.path.exists(path):
                paths.add(path)
    return paths


def main(out_dir: str) -> None:
    conf = effective_config()
    conf.setdefault("cert", CA_DEFAULT)
    pip_conf = Path(out_dir) / "pip.conf"
    pip_conf.write_text("[global]\n" + "".join(f"{k} = {v}\n" for k, v in sorted(conf.items())))
    flags = [f"--volume={pip_conf}:/etc/pip.conf:ro"]
    flags += [f"--volume={p}:{p}:ro" for p in sorted(local_paths(conf))]
    print("\n".join(flags))


if __name__ == "__main__":
    main(sys.argv[1])
