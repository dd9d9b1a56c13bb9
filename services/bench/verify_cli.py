"""CLI verbs of the verify loop: `tandem profile`, `tandem bench cluster`, `tandem compare`, `tandem demo`
(registered in services/bench/cli.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from services.contracts.errors import InvalidArgument


def _write_json(path: Path, data: object) -> None:
    from sim.cli import write_json  # NaN/inf become null, like every other result file

    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, data)


def layout_device(lay: object) -> str | None:
    """The device of the layout's first LLM worker (what the profile's in-process engine runs on)."""
    for role in ("mixed", "prefill", "decode"):
        where = lay.instance(role, 0)  # type: ignore[attr-defined]
        if where is not None:
            return where[1].device_of(where[2])
    return None


def decode_batches(lay: Any) -> int:
    """How many decode batches the layout's cluster runs at once: its decode workers (a split layout's), else
    its mixed workers."""
    decode = sum(p.count for p in lay.pools_of("decode"))
    return decode or sum(p.count for p in lay.pools_of("mixed")) or 1


def profile_to(out: Path, layout: str | None, model: str | None, name: str | None, hardware: str,
               device: str | None, quick: bool, attach: bool, console: object, dtype: str | None = None) -> dict:
    """Measure and write the table; with a layout, the overheads come through its cluster's gateway, and the
    engine runs on the layout's device and dtype unless `device` / `dtype` say otherwise."""
    from rich.progress import Progress

    from services.bench.cluster import running_cluster
    from services.bench.profile import Plan, run_profile, write_profile
    from services.contracts.layout import load_layout
    from services.workers.modelspec import load_model
    from services.workers.server import set_threads

    lay = load_layout(layout) if layout else None
    spec = model if model is not None else (lay.model.path if lay else None)
    table_name = name or (lay.model.name if lay else "smollm2-135m")
    device = device or (layout_device(lay) if lay else None)
    dtype = dtype or (lay.model.dtype if lay else None)
    set_threads(None)  # what a worker process uses: every core but one
    engine = load_model(spec, device, dtype)
    plan = Plan.for_device(engine.device.type, quick)
    with Progress(console=console, transient=False) as bar:
        task = bar.add_task("profiling", total=plan.units())

        def tick(msg: str) -> None:
            bar.update(task, advance=1, description=f"profiling: {msg}")

        if lay is None:
            result = run_profile(engine, table_name, hardware, plan, None, tick)
        else:
            with running_cluster(layout, attach, note=console.print) as (served, _):
                result = run_profile(engine, table_name, hardware, plan, served.gateway.grpc, tick,
                                     decode_workers=decode_batches(served))
    write_profile(result, out)
    return result


def profile_cmd(
    layout: str = typer.Argument(None, help="layout YAML: its model, and its cluster for the overheads"),
    model: str = typer.Option(None, help="checkpoint path or random:... (default: the layout's, else SmolLM2)"),
    name: str = typer.Option(None, help="model name in the table (the simulator's catalog key)"),
    hardware: str = typer.Option("cpu", help="hardware name in the table (the simulator's catalog key)"),
    device: str = typer.Option(None, help="cpu, cuda or cuda:N (default: the layout's first worker's device, "
                               "else the engine's choice); on CUDA the plan covers prompts and contexts to 4096"),
    dtype: str = typer.Option(None, help="float32, bfloat16 or float16 (default: the layout's model.dtype, else "
                              "bfloat16 on CUDA, float32 on CPU)"),
    out: Path = typer.Option(Path("profile.csv"), "--out", help="the table: profile.csv or profile.json"),
    json_out: Path = typer.Option(None, "--json", hidden=True, help="the same as --out"),
    quick: bool = typer.Option(False, help="fewer points (the demo's profile)"),
    attach: bool = typer.Option(False, help="the layout's cluster is already running: measure through it"),
) -> None:
    """Measure this machine's engine, batcher, scheduler and KV path; write the simulator's perf table."""
    out = json_out or out
    from rich.console import Console

    console = Console(stderr=True)
    res = profile_to(out, layout, model, name, hardware, device, quick, attach, console, dtype)
    fit = res["fit"]
    console.print(f"wrote {out}: {len(res['rows'])} rows; KV push {fit['kv_latency_s'] * 1e3:.2f} ms + "
                  f"{fit['kv_gbps'] or 0:.2f} Gbit/s; gateway overhead {fit['request_overhead_s'] * 1e3:.1f} ms "
                  f"per request; load average {res['machine']['loadavg']}")


def bench_cluster_cmd(
    layout: str = typer.Argument(..., help="layout YAML"),
    trace: str = typer.Option("conv", help="'conv', 'code' or a CSV path (sizes are scaled, see --prompt-scale)"),
    rate: float = typer.Option(None, help="requests/s (with --duration: Poisson arrivals sized from the trace)"),
    duration: float = typer.Option(None, help="seconds of arrivals"),
    seed: int = typer.Option(0, help="seed for arrivals and sizes"),
    json_out: Path = typer.Option(None, "--json", help="write the measured result JSON here"),
    out: Path = typer.Option(None, "--out", hidden=True, help="the same as --json (issue 13's spelling)"),
    attach: bool = typer.Option(False, help="the layout's cluster is already running at its addresses"),
    prompt_scale: float = typer.Option(1 / 16, help="prompt tokens = round(trace prompt x this)"),
    output_scale: float = typer.Option(1 / 8, help="output tokens = round(trace output x this)"),
    max_prompt: int = typer.Option(256, help="prompt tokens at most"),
    max_output: int = typer.Option(32, help="output tokens at most"),
) -> None:
    """Replay a (scaled) trace through the layout's gateway; measure TTFT/TBT/E2E like the simulator."""
    out = json_out or out
    from rich.console import Console
    from rich.progress import Progress
    from rich.table import Table

    from services.bench.cluster import Scaling, run_bench_cluster

    console = Console(stderr=True)
    scaling = Scaling(prompt_scale, output_scale, max_prompt, max_output)
    with Progress(console=console) as bar:
        task = bar.add_task("requests", total=None)
        res, w = run_bench_cluster(layout, trace, rate, duration, seed, scaling, out, attach,
                                   progress=lambda n: bar.update(task, completed=n), note=console.print)
    if out is not None:
        _write_json(out, res)
        console.print(f"wrote {out} (workload: {res['workload_csv']})")
    t = Table(title=f"measured: {Path(layout).stem} on {trace} (scaled), {res['requests']} requests")
    t.add_column("metric")
    t.add_column("value", justify="right")
    for k in ("ttft_p50_s", "ttft_p99_s", "tbt_p50_s", "tbt_p99_s", "e2e_p50_s", "e2e_p99_s", "throughput_rps",
              "tokens_per_s", "completed", "dropped"):
        t.add_row(k, f"{res[k]:.4g}")
    Console().print(t)


def compare_cmd(
    predicted: Path = typer.Argument(..., help="`tandem sim run --json` output"),
    measured: Path = typer.Argument(..., help="`tandem bench cluster --json` output"),
    plot: Path = typer.Option(None, help="write overlaid CDFs of TTFT, TBT and E2E here (PNG)"),
    json_out: Path = typer.Option(None, "--json", help="write {predicted, measured, relative_error}"),
    out: Path = typer.Option(None, "--out", hidden=True, help="the same as --json"),
) -> None:
    """Predicted vs measured: relative error per metric, and CDFs."""
    out = json_out or out
    from rich.console import Console

    from services.bench.compare import compare, load_result, plot_cdfs, table

    p, m = load_result(predicted), load_result(measured)
    cmp = compare(p, m)
    Console().print(table(cmp))
    if plot is not None and not plot_cdfs(p, m, plot, f"{predicted.name} vs {measured.name}"):
        raise InvalidArgument("--plot needs per-request `samples` in both files (tandem sim run --json and "
                              "tandem bench cluster --json write them)", param="plot")
    if out is not None:
        _write_json(out, cmp)


def demo_cmd(
    json_out: Path = typer.Option(None, "--json", help="write {predicted, measured, relative_error}"),
    out: Path = typer.Option(None, "--out", hidden=True, help="the same as --json"),
    layout: Path = typer.Option(Path(__file__).resolve().parents[2] / "examples/local-split.yaml",
                                help="the layout to run"),
    plot: Path = typer.Option(Path("demo-cdf.png"), help="where the CDF plot goes"),
    duration: float = typer.Option(20.0, help="seconds of trace arrivals to replay"),
    rate: float = typer.Option(0.5, help="requests/s of the replayed trace"),
) -> None:
    """The whole loop on one machine: run, profile, replay, simulate, compare."""
    out = json_out or out
    from services.bench.demo import run_demo

    res = run_demo(layout, rate, duration, plot)
    if out is not None:
        _write_json(out, res)
