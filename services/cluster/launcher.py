"""`tandem up`: start every service of a layout as its own local process, wait for health, stop them all.

A child that dies is restarted with backoff (`Cluster.supervise`) while the others keep serving.
Children run in their own sessions (a terminal's Ctrl-C reaches only us, and we stop them in order)
and get SIGTERM from the kernel if this process dies without cleaning up: each `tandem serve` child asks for
that itself (`die_with_parent`, PR_SET_PDEATHSIG), since code run between fork and exec in a parent with
threads can deadlock the child before it ever execs, and the parent with it.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from services.cluster.probe import grpc_ok, http_ok
from services.contracts.errors import InvalidArgument, Unavailable
from services.contracts.layout import Layout, parse_device
from services.contracts.roles import DIFFUSION_ROLES, LLM_ROLES, POOL_ROLES
from services.registry import layout_endpoints

PR_SET_PDEATHSIG = 1
PARENT_ENV = "TANDEM_PARENT_PID"  # Cluster.start's pid, for die_with_parent in the child


@dataclass(slots=True)
class ProcSpec:
    """One service to start: its argv and how to tell it is healthy (a gRPC address or an HTTP URL)."""

    name: str
    argv: list[str]
    grpc: str | None = None
    http: str | None = None
    endpoints: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)  # added to the launcher's environment


def _probe_addr(addr: str) -> str:
    host, _, port = addr.rpartition(":")
    return f"127.0.0.1:{port}" if host in ("0.0.0.0", "", "::", "[::]") else addr


def placement(device: str | None, field: str = "device",
              visible: str | None = None) -> tuple[list[str], dict[str, str]]:
    """A worker's device -> (its --device arguments, the environment that pins it).

    'cuda:N' runs the worker with CUDA_VISIBLE_DEVICES=N and --device cuda, so it sees GPU N alone; N counts the
    GPUs this process sees (`visible`, default: our own CUDA_VISIBLE_DEVICES, if set). 'cuda' and 'cpu' pass
    through; None leaves the choice to the worker (CUDA when available)."""
    if device is None:
        return [], {}
    try:
        kind, index = parse_device(device)
    except ValueError as exc:
        raise InvalidArgument(f"{field}: {exc}", param=field) from None
    if kind == "cpu" or index is None:
        return ["--device", kind], {}
    visible = os.environ.get("CUDA_VISIBLE_DEVICES") if visible is None else visible
    if visible is not None and visible.strip():
        ids = [v.strip() for v in visible.split(",") if v.strip()]
        if index >= len(ids):
            raise InvalidArgument(f"{field}: {device!r} asks for GPU {index}, but CUDA_VISIBLE_DEVICES={visible!r} "
                                  f"leaves this process {len(ids)} GPU(s)", param=field)
        return ["--device", "cuda"], {"CUDA_VISIBLE_DEVICES": ids[index]}
    return ["--device", "cuda"], {"CUDA_VISIBLE_DEVICES": str(index)}


def check_devices(layout: Layout, gpus: int | None = None) -> None:
    """Every pool's device exists on this machine; InvalidArgument naming `pools.I.device` otherwise. `gpus`:
    how many GPUs this process sees (default: torch's count, imported only when a pool asks for CUDA)."""
    wanted = [(pi, d) for pi, p in enumerate(layout.pools) if p.count > 0 and p.role in LLM_ROLES
              for d in ([*p.device] if isinstance(p.device, list) else [p.device]) if d and d != "cpu"]
    if not wanted:
        return
    if gpus is None:
        import torch

        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for pi, device in wanted:
        _, index = parse_device(device)
        if gpus == 0:
            raise InvalidArgument(f"pools.{pi}.device: {device!r} needs a CUDA GPU, and CUDA is not available on "
                                  "this machine (use device: cpu, or leave it out)", param=f"pools.{pi}.device")
        if index is not None and index >= gpus:
            raise InvalidArgument(f"pools.{pi}.device: {device!r} asks for GPU {index}, but this machine has "
                                  f"{gpus} GPU(s) (cuda:0..cuda:{gpus - 1})", param=f"pools.{pi}.device")


def plan(layout: Layout, layout_path: str | None) -> list[ProcSpec]:
    """The processes for a layout: workers first (their order in the layout), the gateway last. A worker whose
    pool names a device gets `--device` (and, for cuda:N, CUDA_VISIBLE_DEVICES=N in its environment)."""
    layout.check_servable()
    serve = [sys.executable, "-m", "services.cli", "serve"]
    lay = ["--layout", str(layout_path)] if layout_path else []
    specs = []
    for ep in layout_endpoints(layout):
        where = layout.instance(ep.role, ep.index)
        dev_args, env = placement(where[1].device_of(where[2]), f"pools.{where[0]}.device") if where else ([], {})
        argv = [*serve, ep.role, *lay, *dev_args, "--index", str(ep.index), "--address", ep.bind or ep.address]
        if ep.role in DIFFUSION_ROLES:
            argv = [*serve, ep.role, *lay, "--port", str(ep.port)]
        host = ep.address.rsplit(":", 1)[0]
        extra = [f"metrics http://{host}:{ep.metrics_port}/metrics"] if ep.metrics_port and ep.role in POOL_ROLES else []
        specs.append(ProcSpec(ep.name, argv, grpc=_probe_addr(ep.address), endpoints=[f"grpc {ep.address}", *extra],
                              env=env))
    http, grpc_addr = layout.gateway.http, layout.gateway.grpc
    specs.append(ProcSpec("gateway", [*serve, "gateway", *lay, "--http", http, "--grpc", grpc_addr],
                          http=f"http://{_probe_addr(http)}/health",
                          endpoints=[f"http http://{http}/v1", f"grpc {grpc_addr}", f"metrics http://{http}/metrics"]))
    return specs


def _drained(spec: ProcSpec) -> bool:
    """A draining gateway with no request in flight (its /metrics says so), or one no longer listening."""
    import urllib.request

    url = (spec.http or "").replace("/health", "/metrics")
    try:
        with urllib.request.urlopen(url, timeout=0.5) as r:
            text = r.read().decode()
    except OSError:
        return True
    return "\ntandem_gateway_inflight 0.0" in text


def die_with_parent() -> None:
    """In a process that Cluster.start started (PARENT_ENV set): SIGTERM from the kernel when the launcher dies
    (PR_SET_PDEATHSIG); if it died before this ran, SIGTERM now. The variable is not passed on to this process's
    own children. Elsewhere, and off Linux, nothing."""
    want = os.environ.pop(PARENT_ENV, None)
    if want is None or sys.platform != "linux":
        return
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        return
    if str(os.getppid()) != want:  # the launcher is gone already: we were handed to another parent
        os.kill(os.getpid(), signal.SIGTERM)


@dataclass(slots=True)
class RestartPolicy:
    """A dead process restarts after `backoff_s`, doubling per recent restart up to `max_backoff_s`; more than
    `limit` restarts within `window_s` and the launcher gives up (the whole cluster stops)."""

    backoff_s: float = 0.5
    max_backoff_s: float = 30.0
    limit: int = 5
    window_s: float = 300.0


@dataclass(slots=True)
class _Restarts:
    times: list[float] = field(default_factory=list)  # monotonic times of recent restarts
    due: float | None = None  # when the pending restart runs
    code: int | None = None  # the exit code that caused it
    starting: bool = False  # restarted, not yet healthy again


class Cluster:
    """Owns the processes it starts; `stop()` ends every one of them (SIGTERM, then SIGKILL after a grace);
    `supervise()` restarts the ones that die while the others keep serving."""

    def __init__(self, specs: list[ProcSpec], log_dir: str | Path | None = None,
                 policy: RestartPolicy | None = None) -> None:
        self.specs = specs
        self.log_dir = Path(log_dir or tempfile.mkdtemp(prefix="tandem-up-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.procs: dict[str, subprocess.Popen] = {}
        self.policy = policy or RestartPolicy()
        self.restarts: dict[str, _Restarts] = {}

    def start(self, names: list[str] | None = None) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", PARENT_ENV: str(os.getpid())}
        for spec in self.specs:
            if names is not None and spec.name not in names:
                continue
            log = open(self.log_dir / f"{spec.name}.log", "ab")  # noqa: SIM115 - the child keeps it open
            # no preexec_fn: nothing of ours runs between fork and exec (the child calls die_with_parent)
            self.procs[spec.name] = subprocess.Popen(spec.argv, stdout=log, stderr=subprocess.STDOUT,
                                                     env={**env, **spec.env},
                                                     stdin=subprocess.DEVNULL, start_new_session=True)
            log.close()

    def wait_healthy(self, names: list[str], timeout_s: float = 180.0, on_ready: object = None) -> None:
        """Block until each named service is healthy; a child that exits first fails with its log tail."""
        deadline = time.monotonic() + timeout_s
        pending = [s for s in self.specs if s.name in names]
        while pending:
            for spec in list(pending):
                self.check_alive(spec.name)
                if self._healthy(spec.name, 0.5 if spec.grpc else 1.0):
                    pending.remove(spec)
                    if callable(on_ready):
                        on_ready(spec)
            if pending and time.monotonic() > deadline:
                raise Unavailable(f"not healthy after {timeout_s:.0f}s: {', '.join(s.name for s in pending)} "
                                  f"(logs in {self.log_dir})")
            if pending:
                time.sleep(0.2)

    def check_alive(self, name: str) -> None:
        proc = self.procs[name]
        if proc.poll() is not None:
            raise Unavailable(f"{name} exited with code {proc.returncode}; last log lines:\n{self.log_tail(name)}")

    def dead(self) -> list[str]:
        return [n for n, p in self.procs.items() if p.poll() is not None]

    def supervise(self, say: Callable[[str], None] = print) -> None:
        """One round: schedule a restart for each newly dead process, run the restarts that are due, report
        the restarted ones that are healthy again. Raises Unavailable when a process passes the restart limit."""
        now, pol = time.monotonic(), self.policy
        for name in self.dead():
            r = self.restarts.setdefault(name, _Restarts())
            if r.due is not None:
                continue
            r.times = [t for t in r.times if now - t < pol.window_s]
            code = self.procs[name].returncode
            if len(r.times) >= pol.limit:
                raise Unavailable(f"{name} exited with code {code} after {len(r.times)} restarts in "
                                  f"{pol.window_s:.0f}s; giving up. Last log lines:\n{self.log_tail(name)}")
            delay = min(pol.max_backoff_s, pol.backoff_s * 2 ** len(r.times))
            r.due, r.code = now + delay, code
            say(f"{name} exited with code {code}; restarting in {delay:.1f}s "
                f"(restart {len(r.times) + 1} of at most {pol.limit} in {pol.window_s:.0f}s)")
        for name, r in self.restarts.items():
            if r.due is not None and now >= r.due:
                r.due, r.starting = None, True
                r.times.append(now)
                self.start([name])
                say(f"{name} restarted (pid {self.procs[name].pid})")
            elif r.starting and self.procs[name].poll() is None and self._healthy(name, 0.2):
                r.starting = False
                say(f"{name} is serving again")

    def _healthy(self, name: str, timeout: float) -> bool:
        spec = next(s for s in self.specs if s.name == name)
        return grpc_ok(spec.grpc, timeout) if spec.grpc else http_ok(spec.http or "", timeout)

    def log_tail(self, name: str, lines: int = 15) -> str:
        path = self.log_dir / f"{name}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    def stop(self, grace_s: float = 40.0) -> None:
        """Gateway first: it drains (refuses new requests, lets in-flight streams finish); once it has nothing in
        flight (or has exited), the workers, which drain whatever is left. SIGKILL whatever outlives the grace."""
        deadline = time.monotonic() + grace_s
        gateway = [n for n in self.procs if n == "gateway"]
        workers = [n for n in self.procs if n != "gateway"]
        for name in gateway:
            self._signal(self.procs[name], signal.SIGTERM)
            spec = next(s for s in self.specs if s.name == name)
            while self.procs[name].poll() is None and time.monotonic() < deadline and not _drained(spec):
                time.sleep(0.1)
        for name in workers:
            self._signal(self.procs[name], signal.SIGTERM)
        for name in gateway + workers:
            proc = self.procs[name]
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self._signal(proc, signal.SIGKILL)
                proc.wait(5)
        for proc in self.procs.values():  # grandchildren in the same session, if any
            self._signal(proc, signal.SIGKILL, group_only=True)

    @staticmethod
    def _signal(proc: subprocess.Popen, sig: int, group_only: bool = False) -> None:
        try:
            os.killpg(proc.pid, sig)  # the child leads its own process group (start_new_session)
        except (ProcessLookupError, PermissionError):
            if not group_only and proc.poll() is None:
                proc.send_signal(sig)

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
