"""`tandem bench faults`: break a split cluster one part at a time under live streams (services.bench.faults)."""

from __future__ import annotations

from pathlib import Path

import typer


def bench_faults(
    json_out: Path = typer.Option(None, "--json", help="write the results as JSON here"),
    model: str = typer.Option(None, "--model", help="checkpoint path (default: the embedded SmolLM2)"),
    streams: int = typer.Option(16, min=1, help="concurrent greedy streams per scenario"),
    max_tokens: int = typer.Option(64, min=2, help="tokens per stream"),
    ttl_s: float = typer.Option(3.0, "--ttl-s", min=0.1, help="registry heartbeat TTL"),
    stall_s: float = typer.Option(2.0, "--stall-s", min=0.1, help="gateway: a silent stream moves after this"),
    only: str = typer.Option(",".join(("kill", "stop", "corrupt", "redis-pause", "redis-kill")), "--only",
                             help="comma-separated scenarios to run"),
    log_dir: str = typer.Option(None, "--log-dir", help="where the cluster writes its logs (default: temp)"),
) -> None:
    """Break a running split cluster one part at a time (SIGKILL/SIGSTOP a decode worker, corrupt a KV chunk,
    pause/kill Redis) under live greedy streams; per scenario: accepted, completed, identical, lost, recovery."""
    import json

    from rich.console import Console
    from rich.table import Table

    from services.bench.faults import SCENARIOS, run_faults
    from services.contracts.errors import InvalidArgument

    wanted = tuple(s.strip() for s in only.split(",") if s.strip())
    bad = [s for s in wanted if s not in SCENARIOS]
    if bad or not wanted:
        raise InvalidArgument(f"only: unknown scenario(s) {bad} (known: {', '.join(SCENARIOS)})", param="only")
    console = Console()
    res = run_faults(model, streams, max_tokens, ttl_s, stall_s, wanted, log_dir,
                     say=lambda line: console.print(line, markup=False, highlight=False, soft_wrap=True))
    t = Table(title=f"tandem bench faults: {streams} greedy streams x {max_tokens} tokens, 1 prefill + 2 decode")
    for col in ("scenario", "accepted", "completed", "identical", "lost", "recovery s"):
        t.add_column(col)
    for s in res["scenarios"]:
        t.add_row(s["scenario"], str(s["accepted"]), str(s["completed"]), str(s["identical"]), str(s["lost"]),
                  "-" if s["recovery_s"] is None else f"{s['recovery_s']:.2f}")
    console.print(t)
    for s in res["scenarios"]:
        console.print(f"{s['scenario']}: {s['fault']}" + (f"; first error: {s['errors'][0]}" if s["errors"] else ""),
                      markup=False, highlight=False, soft_wrap=True)
    if json_out:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(res, indent=1))
        console.print(f"wrote {json_out}")
