"""The cluster `tandem bench faults` breaks (and `tandem bench overload` floods): `tandem up` on a generated split
layout, with a private Redis as its registry for the faults."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import yaml


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Redis:
    """A private redis-server (no persistence) this benchmark may pause, kill and restart."""

    def __init__(self, workdir: Path) -> None:
        self.port, self.workdir = free_port(), workdir
        self.proc: subprocess.Popen | None = None

    def start(self) -> Redis:
        import redis

        self.proc = subprocess.Popen([shutil.which("redis-server") or "redis-server", "--port", str(self.port),
                                      "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir",
                                      str(self.workdir)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(200):
            try:
                redis.Redis(port=self.port, socket_timeout=1).ping()
                return self
            except redis.ConnectionError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def pause(self, seconds: float) -> None:
        import redis

        redis.Redis(port=self.port).execute_command("CLIENT", "PAUSE", int(seconds * 1000), "ALL")

    def kill(self) -> None:
        if self.proc:
            self.proc.kill()
            self.proc.wait(10)


class Cluster:
    """`tandem up` on a generated split layout, in the background."""

    def __init__(self, workdir: Path, model: str | None, registry: str, stall_s: float,
                 decode_batching: dict | None = None) -> None:
        from services.contracts.layout import GatewaySpec

        self.ports = {"prefill-0": free_port(), "decode-0": free_port(), "decode-1": free_port()}
        gateway = {"http": f"127.0.0.1:{free_port()}", "grpc": f"127.0.0.1:{free_port()}"}
        if "stall_s" in getattr(GatewaySpec, "model_fields", {}):  # the gateway moves a silent stream this soon
            gateway["stall_s"] = stall_s
        doc = {"name": "faults", "model": {"name": "bench", "path": model},
               "pools": [{"role": "prefill", "count": 1, "base_port": self.ports["prefill-0"]},
                         *({"role": "decode", "count": 1, "base_port": self.ports[name],
                            **({"batching": decode_batching} if decode_batching else {})}
                           for name in ("decode-0", "decode-1"))],
               "gateway": gateway, "registry": registry}
        self.doc = doc
        self.layout = workdir / "layout.yaml"
        self.layout.write_text(yaml.safe_dump(doc))
        self.http = f"http://{gateway['http']}"
        self.log_dir = workdir / "logs"
        self.out = workdir / "up.out"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 600.0) -> None:
        with open(self.out, "wb") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "services.cli", "up", str(self.layout), "--log-dir",
                                          str(self.log_dir)], stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout_s
        while not self.whole():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"tandem up did not come up: {self.out.read_text()[-2000:]}")
            time.sleep(0.3)

    def whole(self) -> bool:
        """Every worker registered and answering (the gateway's /health lists the live ones)."""
        try:
            doc = httpx.get(f"{self.http}/health", timeout=2).json()
        except (httpx.HTTPError, ValueError):
            return False
        ok = {w["address"] for w in doc.get("workers", []) if w.get("ok")}
        return ok >= {f"127.0.0.1:{p}" for p in self.ports.values()}

    def pid(self, name: str) -> int:
        """A running process of the cluster: a worker by name, or "gateway"."""
        want = self.http.removeprefix("http://") if name == "gateway" else f"127.0.0.1:{self.ports[name]}"
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
                stat = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(stat[1]) == self.proc.pid and stat[0] != "Z" and want.encode() in argv:
                return int(entry)
        raise LookupError(f"{name} is not running")

    def live_on(self, name: str, redis_port: int) -> int:
        """The worker's live batch as its last heartbeat in the registry reported it (no RPC to a busy worker)."""
        import redis

        from services.registry.live import WorkerRecord
        from services.registry.redis_store import PREFIX

        raw = redis.Redis(port=redis_port, socket_timeout=1).get(f"{PREFIX}127.0.0.1:{self.ports[name]}")
        return WorkerRecord.from_json(raw).live_requests if raw and raw != b"gone" else 0

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def registered(redis_port: int) -> int:
    import redis

    try:
        c = redis.Redis(port=redis_port, socket_timeout=0.5)
        return sum(c.get(k) not in (None, b"gone") for k in c.keys("tandem:worker:*"))
    except redis.RedisError:
        return 0
