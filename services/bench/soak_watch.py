"""What `tandem bench soak` watches while it runs: each cluster process's RSS (from /proc), each decode worker's KV
in use (its Info: kv_total_bytes - kv_free_bytes) and live rows, and the gateway's requests in flight."""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from services.contracts.layout import Layout
from services.contracts.roles import POOL_ROLES
from services.registry import layout_endpoints
from services.workers.client import WorkerClient

_INFLIGHT = re.compile(r"^tandem_gateway_inflight\s+([0-9.eE+-]+)$", re.M)


@dataclass(frozen=True, slots=True)
class Proc:
    """One process of the cluster: its name (`gateway`, `decode-0`, ...) and how its command line names it."""

    name: str
    flag: str  # "--address" (workers) or "--http" (gateway)
    address: str
    role: str


def cluster_procs(lay: Layout) -> list[Proc]:
    """The gateway and every LLM worker of a layout, as `tandem up` starts them (`services.cli serve ...`)."""
    procs = [Proc(ep.name, "--address", ep.bind or ep.address, ep.role)
             for ep in layout_endpoints(lay) if ep.role in POOL_ROLES]
    return [*procs, Proc("gateway", "--http", lay.gateway.http, "gateway")]


def find_pid(proc: Proc) -> int | None:
    """The live process started as `... serve ... FLAG ADDRESS` (searched in /proc), or None."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if "serve" in argv and any(a == proc.flag and b == proc.address for a, b in zip(argv, argv[1:], strict=False)):
            return int(entry)
    return None


def rss_bytes(pid: int) -> int | None:
    """Resident set size of `pid` (VmRSS), or None once it has gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


@dataclass(slots=True)
class Sample:
    t_s: float  # since the watcher started
    rss: dict[str, int | None]  # process name -> bytes
    kv_in_use: dict[str, int | None]  # decode (or mixed) worker name -> bytes of its KV budget in use
    live: dict[str, int | None]  # decode worker name -> requests in its batch + waiting
    gateway_inflight: float | None
    client_inflight: int


@dataclass(slots=True)
class Watcher:
    """Samples every `every_s` on its own thread (blocking calls stay off the load generator's event loop)."""

    lay: Layout
    every_s: float = 1.0
    client_inflight: Callable[[], int] = lambda: 0
    samples: list[Sample] = field(default_factory=list)
    pids: dict[str, int | None] = field(default_factory=dict)
    pid_changes: list[str] = field(default_factory=list)  # a process that restarted (a new pid) or vanished
    _procs: list[Proc] = field(default_factory=list)
    _clients: dict[str, WorkerClient] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _t0: float = 0.0

    def start(self) -> Watcher:
        self._procs = cluster_procs(self.lay)
        self.pids = {p.name: find_pid(p) for p in self._procs}
        missing = [n for n, pid in self.pids.items() if pid is None]
        if missing:
            raise RuntimeError(f"cannot find the process of {', '.join(missing)} (started by `tandem up` with the "
                               "layout's addresses?)")
        self._clients = {p.name: WorkerClient(p.address) for p in self._procs if p.role in ("decode", "mixed")}
        self._t0 = time.monotonic()
        self.sample()
        self._thread = threading.Thread(target=self._loop, name="soak-watcher", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)
        for c in self._clients.values():
            c.close()

    def now(self) -> float:
        return time.monotonic() - self._t0

    def _loop(self) -> None:
        while not self._stop.wait(self.every_s):
            self.sample()

    def sample(self) -> Sample:
        rss: dict[str, int | None] = {}
        for p in self._procs:
            value = rss_bytes(self.pids[p.name]) if self.pids[p.name] else None
            if value is None:  # gone: restarted by the supervisor under a new pid?
                pid = find_pid(p)
                if pid != self.pids[p.name]:
                    self.pid_changes.append(f"{self.now():.1f}s {p.name}: pid {self.pids[p.name]} -> {pid}")
                    self.pids[p.name] = pid
                value = rss_bytes(pid) if pid else None
            rss[p.name] = value
        kv: dict[str, int | None] = {}
        live: dict[str, int | None] = {}
        for name, c in self._clients.items():
            try:
                i = c.info(timeout=5.0)
                kv[name], live[name] = i.kv_total_bytes - i.kv_free_bytes, i.live_requests + i.waiting_requests
            except Exception:  # noqa: BLE001 - a busy or restarting worker: a gap in the series, not a crash
                kv[name] = live[name] = None
        s = Sample(round(self.now(), 3), rss, kv, live, self._gateway_inflight(), self.client_inflight())
        self.samples.append(s)
        return s

    def _gateway_inflight(self) -> float | None:
        try:
            m = _INFLIGHT.search(httpx.get(f"http://{self.lay.gateway.http}/metrics", timeout=5).text)
        except httpx.HTTPError:
            return None
        return float(m.group(1)) if m else None

    def kv_idle(self) -> bool:
        """The last sample saw every decode worker with no KV in use and nothing live or waiting."""
        s = self.samples[-1] if self.samples else None
        return bool(s) and all(v == 0 for v in s.kv_in_use.values()) and all(v == 0 for v in s.live.values())
