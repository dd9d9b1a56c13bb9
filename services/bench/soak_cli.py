"""`tandem bench soak`: N concurrent streams for D seconds against a split cluster (services.bench.soak)."""

from __future__ import annotations

from pathlib import Path

import typer

SPLIT_LAYOUT = Path(__file__).resolve().parents[2] / "examples/local-split.yaml"


def bench_soak(
    layout: Path = typer.Argument(SPLIT_LAYOUT, help="layout YAML (default: examples/local-split.yaml)"),
    streams: int = typer.Option(256, min=1, help="concurrent streams held for the whole run"),
    duration: float = typer.Option(300.0, min=1.0, help="seconds of load (slots start no new request after it)"),
    max_tokens: int = typer.Option(64, min=2, help="tokens per stream at most (each draws from max/2 to max)"),
    grpc_share: float = typer.Option(0.25, min=0.0, max=1.0, help="share of streams sent over gRPC (services.client)"),
    chat_share: float = typer.Option(0.3, min=0.0, max=1.0, help="share of streams that are chat completions"),
    cancel_share: float = typer.Option(0.1, min=0.0, max=1.0, help="share of streams the client cancels mid-stream"),
    invalid_rate: float = typer.Option(2.0, min=0.0, help="deliberate invalid requests per second"),
    ramp_s: float = typer.Option(10.0, "--ramp-s", min=0.0, help="the stream slots start spread over this"),
    settle_s: float = typer.Option(120.0, "--settle-s", min=1.0, help="after the load: wait this long at most "
                                   "for KV in use to reach zero"),
    sample_s: float = typer.Option(1.0, "--sample-s", min=0.1, help="seconds between samples of RSS and KV"),
    seed: int = typer.Option(0, help="seed of the request mix"),
    model: str = typer.Option(None, "--model", help="checkpoint path (default: the layout's)"),
    attach: bool = typer.Option(False, help="the layout's cluster is already running at its addresses (its "
                                "admission bounds are then what they are)"),
    api_key: str = typer.Option(None, "--api-key", help="the gateway's API key (default: a started cluster gets a "
                                "random one, so wrong-key requests are part of the mix)"),
    json_out: Path = typer.Option(None, "--json", help="write the result (with every sample) here"),
    plot: Path = typer.Option(None, "--plot", help="write RSS, KV in use and in-flight streams over time (PNG)"),
    log_dir: str = typer.Option(None, "--log-dir", help="where a started cluster writes its logs (default: temp)"),
) -> None:
    """Hold N concurrent streams (HTTP SSE and gRPC, completions and chat, some cancelled mid-stream) plus
    deliberate invalid requests for D seconds; report errors by kind, TTFT/ITL, RSS over time, and whether every
    decode worker's KV in use is back to zero afterwards. Exits 1 on an unexpected error or KV left in use."""
    import json
    import tempfile

    import yaml
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from services.bench.soak import SoakConfig, run_soak

    cfg = SoakConfig(streams, duration, max_tokens, grpc_share, chat_share, cancel_share, invalid_rate, ramp_s,
                     sample_s, settle_s, seed)
    if model is not None:
        doc = yaml.safe_load(layout.read_text()) or {}
        doc["model"] = {**(doc.get("model") or {}), "path": model}
        layout = Path(tempfile.mkdtemp(prefix="tandem-soak-")) / layout.name
        layout.write_text(yaml.safe_dump(doc, sort_keys=False))
    console = Console(stderr=True)
    cols = (TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(), TextColumn("{task.fields[stats]}"))
    with Progress(*cols, console=console) as bar:
        task = bar.add_task("soak", total=duration, stats="starting the cluster")

        def tick(load: object, elapsed: float) -> None:
            outs = load.outcomes  # type: ignore[attr-defined]
            bad = sum(o.result == "unexpected" for o in outs)
            done = sum(o.result == "completed" for o in outs)
            bar.update(task, completed=min(elapsed, duration),
                       description="soak" if elapsed < duration else "finishing streams",
                       stats=f"in flight {load.inflight}, completed {done}, unexpected {bad}")  # type: ignore[attr-defined]

        res = run_soak(layout, cfg, attach, api_key, log_dir, tick,
                       note=lambda m: console.print(m, markup=False, highlight=False, soft_wrap=True))
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(res, indent=1))
        console.print(f"wrote {json_out}")
    if plot is not None:
        from services.bench.soak_plot import plot as draw

        console.print(f"wrote {draw(res, plot)}")
    Console().print(table(res))
    for line in res["unexpected_examples"][:5]:
        console.print(f"unexpected: {line}", markup=False, highlight=False, soft_wrap=True)
    if res["unexpected"] or not res["kv_back_to_zero"]:
        raise typer.Exit(1)


def table(res: dict) -> object:
    """The result as the table docs/reliability.md shows."""
    from rich.table import Table

    def ms(d: dict) -> str:
        return " / ".join("-" if d[k] is None else f"{d[k] * 1e3:.0f} ms" for k in ("p50", "p99"))

    c = res["config"]
    t = Table(title=f"tandem bench soak: {c['streams']} streams x {c['duration_s']:.0f} s")
    t.add_column("measure")
    t.add_column("value")
    rows = [("stream requests (completed / cancelled by the client)",
             f"{res['stream_requests']} ({res['completed']} / {res['cancelled_deliberately']})"),
            ("streams in flight (median / max)", f"{res['client_inflight_median']:.0f} / {res['client_inflight_max']}"),
            ("deliberate errors by kind", ", ".join(f"{k} {v}" for k, v in res["deliberate_by_kind"].items()) or "-"),
            ("unexpected errors", f"{res['unexpected']} {res['unexpected_by_kind'] or ''}"),
            ("TTFT p50 / p99", ms(res["ttft_s"])), ("ITL p50 / p99", ms(res["itl_s"]))]
    for name, r in res["rss_mb"].items():
        rows.append((f"RSS {name} MiB (warm / end / max; slope MiB/min)",
                     f"{r['warm'] or 0:.0f} / {r['end'] or 0:.0f} / {r['max'] or 0:.0f}; "
                     f"{r['slope_mb_per_min_2nd_half'] if r['slope_mb_per_min_2nd_half'] is None else round(r['slope_mb_per_min_2nd_half'], 2)}"))
    rows.append(("KV in use after (bytes per decode worker)",
                 f"{res['kv_in_use_after_bytes']} (zero {res['kv_zero_after_s']} s after the load)"
                 if res["kv_back_to_zero"] else f"{res['kv_in_use_after_bytes']} NOT back to zero"))
    for name, value in rows:
        t.add_row(name, value)
    return t
