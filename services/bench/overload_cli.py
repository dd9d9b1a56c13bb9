"""`tandem bench overload`: a burst of many times the cluster's capacity; 429 latency and completions
(services.bench.overload)."""

from __future__ import annotations

from pathlib import Path

import typer


def bench_overload(
    json_out: Path = typer.Option(None, "--json", help="write the results as JSON here"),
    model: str = typer.Option(None, "--model", help="checkpoint path (default: the embedded SmolLM2)"),
    factor: int = typer.Option(4, min=2, help="requests per burst, as a multiple of the cluster's capacity"),
    max_tokens: int = typer.Option(200, "--max-tokens", min=2, help="tokens per accepted request"),
    hold_tokens: int = typer.Option(1000, "--hold-tokens", min=2,
                                    help="scenario full: tokens per request holding a place during the burst"),
    rounds: int = typer.Option(3, min=1, help="times each (client, scenario) runs; the rows pool them"),
    clients: str = typer.Option("raw,httpx", help="comma-separated burst clients: raw, httpx"),
    only: str = typer.Option("burst,full", "--only", help="comma-separated scenarios: burst, full"),
    log_dir: str = typer.Option(None, "--log-dir", help="where the cluster writes its logs (default: temp)"),
) -> None:
    """Send FACTOR x the cluster's admission capacity at once (scenario burst: to an idle cluster; full: while
    every place is taken by running requests); per client and scenario: 200s, 429s, anything else, completed,
    Retry-After, how long the burst took to leave the client, the 429 latency (client p50/p99/max), the
    gateway's own time per refusal (its histogram), and its event-loop thread from the first request sent to
    the last 429 read: time on a CPU / time waiting for one (Linux schedstat)."""
    import json

    from rich.console import Console
    from rich.table import Table

    from services.bench.overload import CLIENTS, SCENARIOS, run_overload
    from services.contracts.errors import InvalidArgument

    def pick(value: str, known: tuple[str, ...], name: str) -> tuple[str, ...]:
        wanted = tuple(s.strip() for s in value.split(",") if s.strip())
        bad = [s for s in wanted if s not in known]
        if bad or not wanted:
            raise InvalidArgument(f"{name}: unknown value(s) {bad} (known: {', '.join(known)})", param=name)
        return wanted

    wanted_clients, wanted = pick(clients, CLIENTS, "clients"), pick(only, SCENARIOS, "only")
    console = Console(width=200)  # the table's 13 columns
    res = run_overload(model, factor, max_tokens, hold_tokens, rounds, wanted_clients, wanted, log_dir,
                       say=lambda line: console.print(line, markup=False, highlight=False, soft_wrap=True))
    cfg = res["config"]
    t = Table(title=f"tandem bench overload: {factor} x capacity {cfg['capacity']} per burst, {rounds} round(s), "
                    f"load average {cfg['load_average']['min']:.1f}-{cfg['load_average']['max']:.1f} on "
                    f"{cfg['cores']} cores")
    for col in ("client", "scenario", "sent", "200", "429", "other", "completed", "Retry-After", "sent over ms",
                "429 p50 ms", "429 p99 ms", "429 max ms", "door p99 <= ms", "loop ran / waited ms"):
        t.add_column(col)

    def ms(x: float | None) -> str:
        return "-" if x is None else f"{x:.1f}" if x >= 1 else f"{x:.2f}"

    for r in res["rows"]:
        t.add_row(r["client"], r["scenario"], str(r["sent"]), str(r["accepted"]), str(r["refused"]),
                  str(sum(r["other"].values())), f"{r['completed']}/{r['accepted_total']}",
                  f"{r['retry_after']}/{r['refused']}", ms(r["spread_ms"]), ms(r["refused_p50_ms"]),
                  ms(r["refused_p99_ms"]), ms(r["refused_max_ms"]), ms(r["door_p99_le_ms"]),
                  f"{ms(r['loop_ran_ms'])} / {ms(r['loop_waited_ms'])}")
    console.print(t)
    if json_out:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(res, indent=1))
        console.print(f"wrote {json_out}")
