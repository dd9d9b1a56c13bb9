"""`tandem bench fusion`: temporal fusion vs static batching vs one-at-a-time, side by side on one model."""

from __future__ import annotations

import json
from pathlib import Path

import typer


def bench_fusion(
    quick: bool = typer.Option(False, "--quick", help="12 requests, 2 arrival rates: under 2 minutes on 2 cores."),
    json_path: Path | None = typer.Option(None, "--json", help="Write the full result here."),
    rates: str | None = typer.Option(None, "--rates", help="Arrival rates in requests/s, comma-separated "
                                     "(default: --loads x the measured one-at-a-time capacity)."),
    loads: str | None = typer.Option(None, "--loads", help="Multiples of the one-at-a-time capacity (default 0.5,2,8; "
                                     "quick 2,8)."),
    model: str = typer.Option("default", "--model", help="default (SmolLM2 via load_engine), or random weights with "
                              "the shapes of: tiny, smollm2-135m, llama-3.2-1b."),
    device: str | None = typer.Option(None, "--device", help="cpu or cuda (default: cuda when available)."),
    dtype: str | None = typer.Option(None, "--dtype", help="float32 / bfloat16 (default: the device's)."),
    requests: int | None = typer.Option(None, "--requests", help="Number of requests (default 32; quick 12)."),
    max_batch: int | None = typer.Option(None, "--max-batch", help="Batch slots for fusion and static (default 16)."),
    scale: float | None = typer.Option(None, "--scale", help="Divide the trace's lengths by this (default 8; quick 16)."),
    max_prompt: int | None = typer.Option(None, "--max-prompt", help="Clip prompt lengths (default 128; quick 96)."),
    max_new: int | None = typer.Option(None, "--max-new", help="Clip generation lengths (default 64; quick 40)."),
    threads: int | None = typer.Option(None, "--threads", help="torch CPU threads (default 1 on CPU)."),
    plot: Path | None = typer.Option(None, "--plot", help="Write the throughput/latency plot (PNG) here."),
) -> None:
    """Poisson arrivals, trace-shaped lengths; tokens/s and p50/p99 latency per policy; greedy tokens vs solo runs."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from services.bench.fusion import config_from, run_bench, table

    cfg = config_from(quick, rates, loads, model, device, dtype, requests, max_batch, scale, max_prompt, max_new, threads)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), transient=True) as bar:
        tasks: dict[str, int] = {}

        def progress(what: str, done: int, total: int) -> None:
            key = "prep" if what.startswith("prefill") else "runs"
            if key not in tasks:
                tasks[key] = bar.add_task(what, total=total)
            bar.update(tasks[key], completed=done, description=what)

        result = run_bench(cfg, progress)
    typer.echo(table(result))
    r = result["reorder"]
    typer.echo(f"model {result['model']} on {result['device']} ({result['dtype']}); trace {result['trace']}")
    typer.echo(f"identical_tokens: {result['identical_tokens']} | reorder: one slot move {r['move_s'] * 1e3:.3f} ms = "
               f"{r['move_over_step']:.1%} of a fused step; gathered step {r['gathered_over_dense']:.2f}x the dense one "
               f"| {result['wall_s']:.1f} s")
    if json_path:
        json_path.write_text(json.dumps(result, indent=2))
    if plot:
        from services.bench.fusion_plots import plot as draw

        draw(result, plot)


def plot_cmd(
    result: Path = typer.Argument(..., help="a result JSON of `tandem bench fusion --json`"),
    png: Path = typer.Argument(..., help="the PNG to write"),
) -> None:
    """The throughput/latency plot of a saved `tandem bench fusion` result."""
    from services.bench.fusion_plots import plot as draw

    typer.echo(draw(json.loads(result.read_text()), png))
