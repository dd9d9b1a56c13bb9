"""CLI verbs of the cluster area: `tandem up`, `tandem serve ROLE`, `tandem compose`, `tandem k8s`."""

from __future__ import annotations

import importlib
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer

from services.contracts.errors import InvalidArgument, Unavailable
from services.contracts.roles import DIFFUSION_ROLES, ROLES


def _layout(path: str | None) -> Any:
    from services.contracts.layout import load_layout

    return load_layout(path)


def up(layout: str | None = None, log_dir: str | None = None, timeout_s: float = 300.0, fail_fast: bool = False,
       restart_limit: int = 5) -> int:
    """Start the cluster, print its endpoints, block until SIGINT/SIGTERM, stop everything. Returns the exit code.

    A process that dies is restarted (with backoff, at most `restart_limit` times in 5 minutes) while the others
    keep serving; with `fail_fast` the first death stops the whole cluster instead.
    """
    from rich.console import Console
    from rich.table import Table

    from services.cluster.launcher import Cluster, RestartPolicy, check_devices, plan

    lay = _layout(layout)
    specs = plan(lay, layout)
    check_devices(lay)  # a pool on a GPU this machine lacks: a clear error before anything starts
    console = Console(stderr=True)
    stop = {"signal": None}

    def on_signal(signum: int, _frame: object) -> None:
        stop["signal"] = signum
        raise KeyboardInterrupt

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    cluster = Cluster(specs, log_dir, RestartPolicy(limit=restart_limit))
    code = 0
    try:
        workers = [s.name for s in specs if s.name != "gateway"]
        console.print(f"starting {len(specs)} processes for layout [bold]{lay.name}[/] (logs in {cluster.log_dir})")
        cluster.start(workers)
        with console.status("waiting for the workers to load the model..."):
            cluster.wait_healthy(workers, timeout_s, on_ready=lambda s: console.print(f"  {s.name} ready"))
        cluster.start(["gateway"])
        cluster.wait_healthy(["gateway"], timeout_s)
        table = Table(title=f"tandem cluster '{lay.name}' is up (Ctrl-C stops it)")
        for col in ("service", "pid", "endpoints"):
            table.add_column(col)
        for s in specs:
            table.add_row(s.name, str(cluster.procs[s.name].pid), "\n".join(s.endpoints))
        Console().print(table)
        sys.stdout.flush()
        while True:
            dead = cluster.dead()
            if dead and fail_fast:
                raise Unavailable(f"{dead[0]} exited unexpectedly; last log lines:\n{cluster.log_tail(dead[0])}")
            cluster.supervise(lambda line: console.print(line, markup=False, highlight=False, soft_wrap=True))
            time.sleep(0.25)
    except KeyboardInterrupt:
        console.print(f"stopping ({signal.Signals(stop['signal'] or signal.SIGINT).name})...")
    except Unavailable:
        code = 1
        raise
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not interrupt the cleanup
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        cluster.stop()
        for s, h in old.items():
            signal.signal(s, h)
        console.print("all processes stopped")
    return code


def serve_role(role: str, layout: str | None, address: str | None, index: int, metrics_port: int | None,
               http: str | None, grpc_address: str | None, workers: list[str], port: int | None,
               advertise: str | None = None, max_inflight: int | None = None, device: str | None = None) -> None:
    """Run one service in the foreground. A worker runs on `device`, else its pool's (the layout's `device`)."""
    from services.cluster.launcher import die_with_parent

    die_with_parent()  # started by `tandem up` (or any Cluster): end with it
    if role not in ROLES:
        raise InvalidArgument(f"role: must be one of {', '.join(ROLES)} (got {role!r})", param="role")
    lay = _layout(layout)
    if role == "gateway":
        from services.gateway.server import serve

        serve(lay, http, grpc_address, workers, max_inflight)
        return
    if role in DIFFUSION_ROLES:
        server = _optional(f"services.{role}.server", role)
        if port is None:
            from services.registry import layout_endpoints

            eps = [e for e in layout_endpoints(lay, (role,)) if e.index == index]
            port = eps[0].port if eps else None
        if port is None:
            raise InvalidArgument(f"port: `tandem serve {role}` needs --port (or a {role} pool in the layout)",
                                  param="port")
        from services.registry import METRICS_PORT_OFFSET

        # both services take metrics_port; pin it so `tandem up` and compose can list /metrics for them
        server.serve(port=port, metrics_port=metrics_port if metrics_port is not None else port + METRICS_PORT_OFFSET)
        return
    from services.registry import METRICS_PORT_OFFSET, layout_endpoints

    eps = [e for e in layout_endpoints(lay, (role,)) if e.index == index]
    if address is None:
        if not eps:
            raise InvalidArgument(f"address: the layout has no {role} worker #{index}; pass --address HOST:PORT",
                                  param="address")
        address = eps[0].bind or eps[0].address
    if metrics_port is None:
        metrics_port = int(address.rsplit(":", 1)[1]) + METRICS_PORT_OFFSET
    where = lay.instance(role, index)  # (pool position, pool, instance in the pool)
    pool = where[1] if where else next((p for p in lay.pools if p.role == role and p.count > 0), None)
    batching = (pool.batching if pool and pool.batching else None) or lay.batching
    if device is not None:
        from services.contracts.layout import parse_device

        try:
            kind, gpu = parse_device(device)
        except ValueError as exc:
            raise InvalidArgument(f"--device: {exc}", param="device") from None
        device = kind if gpu is None else f"{kind}:{gpu}"
    elif where is not None:
        device = where[1].device_of(where[2])
    server = _optional("services.workers.server", role)
    server.serve(role=role, address=address, model=lay.model.path, batching=batching, metrics_port=metrics_port,
                 registry=lay.registry, advertise=advertise or (eps[0].address if eps else None), index=index,
                 device=device, dtype=lay.model.dtype, kv_path=lay.kv_link.path)


def _optional(module: str, role: str) -> Any:
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name and module.startswith(exc.name):
            raise Unavailable(f"role {role!r} is not available in this build: {module} is missing") from None
        raise


def register(group: Callable[[str], typer.Typer]) -> None:
    app = group("")

    @app.command("up")
    def up_cmd(
        layout: str = typer.Argument(None, help="layout YAML; none = one mixed worker + gateway on this machine"),
        log_dir: str = typer.Option(None, "--log-dir", help="where each process writes its log (default: a temp dir)"),
        timeout_s: float = typer.Option(300.0, "--timeout", help="seconds to wait for every service to be healthy"),
        fail_fast: bool = typer.Option(False, "--fail-fast", help="stop the whole cluster when any process dies "
                                       "(default: restart it with backoff while the others keep serving)"),
        restart_limit: int = typer.Option(5, "--restart-limit", min=0, help="restarts of one process within 5 "
                                          "minutes before `tandem up` gives up and stops the cluster"),
    ) -> None:
        """Start gateway + workers as local processes; stay in the foreground until Ctrl-C/SIGTERM, then stop all.

        A process that dies is restarted (backoff 0.5 s doubling, log line in this terminal) unless --fail-fast."""
        raise typer.Exit(up(layout, log_dir, timeout_s, fail_fast, restart_limit))

    @app.command("serve")
    def serve_cmd(
        role: str = typer.Argument(..., help=f"one of: {', '.join(ROLES)}"),
        layout: str = typer.Option(None, "--layout", help="layout YAML (model, batching, ports)"),
        address: str = typer.Option(None, "--address", help="worker gRPC HOST:PORT (default: from the layout)"),
        index: int = typer.Option(0, "--index", help="which instance of the role's pool in the layout"),
        metrics_port: int = typer.Option(None, "--metrics-port", help="worker Prometheus port (default: gRPC port + 1000)"),
        http: str = typer.Option(None, "--http", help="gateway HTTP HOST:PORT (default: layout gateway.http)"),
        grpc_address: str = typer.Option(None, "--grpc", help="gateway gRPC HOST:PORT (default: layout gateway.grpc)"),
        worker: list[str] = typer.Option([], "--worker", help="gateway: ROLE=HOST:PORT, repeatable; overrides the layout"),
        port: int = typer.Option(None, "--port", help="dlm/policy gRPC port"),
        advertise: str = typer.Option(None, "--advertise", help="worker: HOST:PORT the gateway reaches it at, as "
                                      "registered in a redis registry (default: the layout's address)"),
        max_inflight: int = typer.Option(None, "--max-inflight", help="gateway: requests held at once, beyond "
                                         "which clients get 429 (default: layout gateway.max_inflight, else what "
                                         "the pools hold)"),
        device: str = typer.Option(None, "--device", help="worker: cpu, cuda or cuda:N (default: its pool's "
                                   "`device` in the layout, else CUDA when available)"),
    ) -> None:
        """Run one service (prefill, decode, mixed, gateway, dlm, policy) until SIGINT/SIGTERM (which drains)."""
        serve_role(role, layout, address, index, metrics_port, http, grpc_address, list(worker), port, advertise,
                   max_inflight, device)

    @app.command("compose")
    def compose_cmd(
        layout: str = typer.Argument(None, help="layout YAML; none = the one-machine default"),
        output: str = typer.Option(None, "-o", "--output", help="write here instead of stdout"),
    ) -> None:
        """Write the layout's cluster as a Compose file (one container per service)."""
        from services.cluster.compose import render

        text = render(_layout(layout), layout)
        if output:
            Path(output).write_text(text)
            typer.echo(f"wrote {output}", err=True)
        else:
            typer.echo(text, nl=False)

    @app.command("k8s")
    def k8s_cmd(
        layout: str = typer.Argument(None, help="layout YAML; none = the one-machine default"),
        output: str = typer.Option(..., "-o", "--output", help="directory for kustomization.yaml + one file per object"),
        namespace: str = typer.Option(None, "--namespace", help="set in kustomization.yaml (default: none)"),
        redis_url: str = typer.Option(None, "--redis-url", help="an existing Redis for the registry instead of "
                                      "deploying one (default: the layout's redis:// registry, else our own)"),
    ) -> None:
        """Write the layout's cluster as Kubernetes manifests (Kustomize-ready): `kubectl apply -k DIR`."""
        from services.cluster.k8s import write

        paths = write(_layout(layout), output, layout, namespace, redis_url)
        typer.echo(f"wrote {len(paths)} files to {output} (kubectl apply -k {output})", err=True)
