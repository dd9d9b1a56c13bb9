"""Helpers for the cluster tests: run `tandem up LAYOUT` as a real subprocess and find the processes it started."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import yaml


@dataclass
class Up:
    proc: subprocess.Popen
    http: str
    grpc: str
    log_dir: Path

    def children(self) -> list[int]:
        return children_of(self.proc.pid)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout)


def children_of(pid: int) -> list[int]:
    """Live processes whose parent is `pid` (from /proc)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid and fields[0] != "Z":
            out.append(int(entry))
    return out


def child_named(pid: int, *argv_tail: str) -> int:
    """The child of `pid` whose command line ends with `argv_tail` (e.g. "--index", "1", "--address", addr)."""
    for kid in children_of(pid):
        argv = Path(f"/proc/{kid}/cmdline").read_bytes().decode().split("\0")[:-1]
        if argv[-len(argv_tail):] == list(argv_tail):
            return kid
    raise LookupError(f"no child of {pid} ends with {argv_tail}")


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def write_layout(path: Path, model_path: str | None, pools: list[dict], http_port: int, grpc_port: int,
                 name: str = "test", **extra: object) -> Path:
    """A layout file; `extra` adds top-level keys (registry, batching, ...)."""
    doc = {"name": name, "model": {"name": "tiny" if model_path else "smollm2-135m", "path": model_path},
           "pools": pools, "gateway": {"http": f"127.0.0.1:{http_port}", "grpc": f"127.0.0.1:{grpc_port}"}, **extra}
    path.write_text(yaml.safe_dump(doc))
    return path


def start_up(layout: Path, log_dir: Path, timeout_s: float = 240.0, args: tuple[str, ...] = ()) -> Up:
    """`tandem up LAYOUT [args]` in the background; returns once the gateway's /health answers 200."""
    lay = yaml.safe_load(layout.read_text())
    http, grpc_addr = lay["gateway"]["http"], lay["gateway"]["grpc"]
    out = open(log_dir.parent / f"{log_dir.name}-up.out", "wb")  # noqa: SIM115
    proc = subprocess.Popen([sys.executable, "-m", "services.cli", "up", str(layout), "--log-dir", str(log_dir), *args],
                            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    up = Up(proc, f"http://{http}", grpc_addr, log_dir)
    ours = {f"127.0.0.1:{p['base_port'] + i}" for p in lay.get("pools", []) if p.get("base_port")
            for i in range(p.get("count", 1))}
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"tandem up exited {proc.returncode}: {Path(out.name).read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{up.http}/health", timeout=1) as r:
                # ours, not another test's gateway that still holds a port free_port() handed out again
                seen = {w.get("address") for w in json.loads(r.read()).get("workers", [])}
                if r.status == 200 and (not ours or ours & seen):
                    return up
        except (OSError, ValueError):
            pass
        time.sleep(0.3)
    up.stop(signal.SIGKILL)
    raise RuntimeError(f"cluster not healthy in {timeout_s}s: {Path(out.name).read_text()[-3000:]}")


def start_roles(d: Path, model_path: str | None, roles: list[str], name: str) -> Up:
    """`tandem up` of one worker per entry of `roles` (each on free ports), its layout and logs under `d`."""
    from kit.net import free_port

    pools = [{"role": r, "count": 1, "base_port": free_port()} for r in roles]
    return start_up(write_layout(d / "layout.yaml", model_path, pools, free_port(), free_port(), name=name), d / "logs")
