"""`tandem sim run|search|report|dlm-table`: the capacity planner's command line (`tandem bench sim` is in
services/bench/cli.py)."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import typer

sim_app = typer.Typer(no_args_is_help=True, help="Simulate a layout: latency, throughput, cost and power.")


def _clean(obj: object) -> object:
    """JSON without NaN/inf (they become null), so any JSON reader can load the result."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_clean(v) for v in obj]
    return obj


def write_json(path: Path, data: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_clean(data), indent=2, sort_keys=False) + "\n")


@sim_app.command("run")
def run_cmd(
    layout: Path = typer.Argument(..., help="layout YAML"),
    trace: str = typer.Option("conv", help="'conv', 'code', a CSV path, fixed:PROMPT:OUTPUT or "
                              "lognormal:MEDIAN_PROMPT:MEDIAN_OUTPUT[:SIGMA]"),
    rate: float | None = typer.Option(None, help="requests/s; with --duration: synthetic arrivals, "
                                      "else the trace is time-scaled to this mean rate"),
    duration: float | None = typer.Option(None, help="seconds of arrivals"),
    seed: int = typer.Option(0, help="seed for synthetic arrivals, size sampling and the simulator's own draws "
                             "(a profile's step jitter)"),
    arrival: str = typer.Option("poisson", help="'poisson' or 'gamma' (synthetic arrivals)"),
    cv: float = typer.Option(1.0, help="coefficient of variation of gamma inter-arrival times"),
    perf: str | None = typer.Option(None, help="override sim.perf_model: roofline, profile or a CSV path"),
    json_out: Path | None = typer.Option(None, "--json", help="write the result JSON here"),
    out: Path | None = typer.Option(None, "--out", hidden=True, help="old spelling of --json"),
) -> None:
    """Simulate LAYOUT on a trace and print (and optionally write) the metrics."""
    out = json_out or out
    from rich.console import Console
    from rich.progress import Progress

    from services.contracts.layout import load_layout
    from sim.cluster import SimulatedCluster
    from sim.results import run_samples, summarize_run
    from sim.trace import make_workload

    lay = load_layout(layout)
    if perf is not None:
        lay = lay.model_copy(update={"sim": lay.sim.model_copy(update={"perf_model": perf})})
    wl = make_workload(trace, rate=rate, duration_s=duration, seed=seed, arrival=arrival, cv=cv)
    cluster = SimulatedCluster(lay, wl, seed)
    console = Console(stderr=True)
    if len(wl) > 5000:
        with Progress(console=console, transient=True) as bar:
            task = bar.add_task(f"simulating {len(wl)} requests", total=1.0)
            run = cluster.run(lambda now, end: bar.update(task, completed=now / end if end else 1.0))
    else:
        run = cluster.run()
    res = summarize_run(run)
    res = {"layout": lay.name, "trace": trace, "rate": rate, "duration": duration, "seed": seed, **res}
    if out is not None:
        write_json(out, {**res, "samples": run_samples(run)})  # per-request samples for `tandem compare`
    _print_summary(console, res)


def _print_summary(console: object, res: dict) -> None:
    from rich.table import Table

    t = Table(title=f"{res['layout']} on {res['trace']}", show_header=True)
    t.add_column("metric")
    t.add_column("p50", justify="right")
    t.add_column("p90", justify="right")
    t.add_column("p99", justify="right")
    for name in ("ttft", "tbt", "tbt_mean", "e2e"):
        t.add_row(f"{name} (s)", *(f"{res[f'{name}_p{q}_s']:.4f}" for q in (50, 90, 99)))
    console.print(t)  # type: ignore[attr-defined]
    console.print(  # type: ignore[attr-defined]
        f"completed {res['completed']}  dropped {res['dropped']}  throughput {res['throughput_rps']:.2f} req/s  "
        f"{res['tokens_per_s']:.0f} tok/s  SLO attainment {res['slo_attainment']:.3f}  "
        f"Splitwise slowdown SLOs {'met' if res['slowdown_slo_met'] else 'missed'}\n"
        f"cost ${res['cost_per_hour']:.2f}/h  ${res['cost_per_million_tokens']:.3f}/1M tok  "
        f"power mean {res['power_mean_w']:.0f} W peak {res['power_peak_w']:.0f} W  "
        f"{res['energy_per_token_j']:.3f} J/token")
    d = res.get("dlm")
    if d:
        console.print(  # type: ignore[attr-defined]
            f"dlm pool ({d['machines']} machines, {d['variant']}): {d['completed']}/{d['requests']} requests  "
            f"latency p50 {d['latency_p50_s']:.4f} s  p90 {d['latency_p90_s']:.4f} s  p99 {d['latency_p99_s']:.4f} s  "
            f"utilization {d['utilization']:.2f}  ${d['cost_per_hour']:.2f}/h  "
            f"${d['cost_per_million_requests']:.2f}/1M requests  {d['energy_per_request_j']:.2f} J/request")


@sim_app.command("search")
def search_cmd(
    layout: Path = typer.Argument(..., help="base layout YAML (model, batching, link, SLO, perf model)"),
    trace: str = typer.Option("conv", help="trace whose request sizes are sampled"),
    rate: float | None = typer.Option(None, help="cheapest layout meeting the SLO at this load (req/s)"),
    budget: str | None = typer.Option(None, help="'power=408000' (W) or 'cost=1520' ($/h): best throughput"),
    hardware: str = typer.Option("dgx-h100,dgx-a100", help="hardware for --rate (comma-separated)"),
    prefill_hw: str = typer.Option("dgx-h100", "--prefill-hw", help="prefill workers' hardware for --budget"),
    decode_hw: str = typer.Option("dgx-h100", "--decode-hw", help="decode workers' hardware for --budget"),
    decode_cap_w: float | None = typer.Option(None, "--decode-cap-w", help="power cap of decode workers for --budget"),
    prompt_hw: str | None = typer.Option(None, "--prompt-hw", hidden=True, help="old spelling of --prefill-hw"),
    token_hw: str | None = typer.Option(None, "--token-hw", hidden=True, help="old spelling of --decode-hw"),
    token_cap_w: float | None = typer.Option(None, "--token-cap-w", hidden=True, help="old spelling of --decode-cap-w"),
    step: int = typer.Option(1, help="prefill-worker count step for --budget"),
    max_machines: int = typer.Option(80, help="largest pool tried for --rate"),
    duration: float = typer.Option(60.0, help="seconds of Poisson arrivals per probe"),
    seed: int = typer.Option(0),
    criterion: str = typer.Option("slowdown", help="'slowdown' (Splitwise's SLOs) or 'attainment'"),
    target: float = typer.Option(0.99, help="SLO attainment target for --criterion attainment"),
    json_out: Path | None = typer.Option(None, "--json", help="write all designs as JSON"),
    out: Path | None = typer.Option(None, "--out", hidden=True, help="old spelling of --json"),
    jobs: int = typer.Option(1, help="designs probed at once, in local processes (same answer as 1)"),
    ray: str | None = typer.Option(None, "--ray", help="run the probes on a Ray cluster at this address "
                                   "('local' starts one here); needs the ray extra (pip install 'tandem\\[ray]')"),
) -> None:
    """Cheapest layout for a load (--rate) or best throughput within a power/cost budget (--budget)."""
    out = json_out or out
    from rich.console import Console
    from rich.progress import Progress
    from rich.table import Table

    from services.contracts.errors import InvalidArgument
    from services.contracts.layout import load_layout
    from sim import search

    if (rate is None) == (budget is None):
        raise InvalidArgument("search: give exactly one of --rate or --budget", param="rate")
    if criterion not in ("slowdown", "attainment"):
        raise InvalidArgument(f"criterion: must be 'slowdown' or 'attainment', got {criterion!r}", param="criterion")
    prefill_hw, decode_hw = prompt_hw or prefill_hw, token_hw or decode_hw
    decode_cap_w = token_cap_w if token_cap_w is not None else decode_cap_w
    base = load_layout(layout)
    console = Console(stderr=True)
    with Progress(console=console, transient=True) as bar:
        task = bar.add_task("searching", total=None)
        tick = lambda name, total: bar.update(task, advance=1, total=total, description=name)  # noqa: E731
        if rate is not None:
            if rate <= 0:
                raise InvalidArgument(f"rate: must be > 0, got {rate}", param="rate")
            rows = search.cheapest_for_load(base, trace, rate, [h.strip() for h in hardware.split(",")],
                                            max_machines=max_machines, duration_s=duration, seed=seed,
                                            criterion=criterion, target=target, progress=tick, jobs=jobs,
                                            ray_address=ray)
        else:
            kind, _, value = budget.partition("=")
            try:
                amount = float(value)
            except ValueError:
                raise InvalidArgument(f"budget: expected power=WATTS or cost=DOLLARS_PER_HOUR, got {budget!r}",
                                      param="budget") from None
            rows = search.best_under_budget(base, trace, prefill_hw, decode_hw, kind.strip(), amount,
                                            duration_s=duration, seed=seed, step=step, decode_cap_w=decode_cap_w,
                                            progress=tick, jobs=jobs, ray_address=ray)
    t = Table(title="designs (best first)")
    for col in ("name", "max rate (req/s)", "$/h", "provisioned kW"):
        t.add_column(col)
    for r in rows[:15]:
        t.add_row(r["name"], f"{r['max_rate_rps']:.1f}", f"{r['cost_per_hour']:.0f}",
                  f"{r['power_provisioned_w'] / 1e3:.0f}")
    console.print(t)
    if out is not None:
        write_json(out, {"trace": trace, "rate": rate, "budget": budget, "designs": rows})


@sim_app.command("report")
def report_cmd(
    layouts: list[Path] = typer.Argument(..., help="layout YAMLs to compare"),
    trace: str = typer.Option("conv"),
    rate: float = typer.Option(40.0, help="load for the latency CDFs (req/s)"),
    rates: str = typer.Option("10,20,30,40,50,60,70,80,90,100,110,120", help="loads for the throughput sweep"),
    duration: float = typer.Option(60.0, help="seconds of arrivals per simulation"),
    seed: int = typer.Option(0),
    out_dir: Path = typer.Option(Path("docs/results/sim"), help="where the PNGs and report.json go"),
    prefix: str = typer.Option("sim_", help="file-name prefix of the plots"),
    json_out: Path | None = typer.Option(None, "--json", help="also write every number as JSON here"),
    jobs: int = typer.Option(1, help="layouts simulated at once, in local processes (same answer as 1)"),
    ray: str | None = typer.Option(None, "--ray", help="run on a Ray cluster at this address ('local' starts "
                                   "one here); needs the ray extra (pip install 'tandem\\[ray]')"),
) -> None:
    """Latency CDFs, throughput vs rate and the cost/power frontier of several layouts, as PNGs (+ JSON)."""
    from services.contracts.errors import InvalidArgument
    from sim.report import make_report

    try:
        rate_list = [float(x) for x in rates.split(",") if x.strip()]
    except ValueError:
        raise InvalidArgument(f"rates: expected comma-separated numbers, got {rates!r}", param="rates") from None
    if not rate_list or min(rate_list) <= 0:
        raise InvalidArgument("rates: need at least one rate, all > 0", param="rates")
    summary = make_report(layouts, trace=trace, rate=rate, rates=rate_list, duration_s=duration, seed=seed,
                          out_dir=out_dir, prefix=prefix, json_out=json_out, jobs=jobs, ray_address=ray)
    typer.echo(summary)


@sim_app.command("dlm-table")
def dlm_table_cmd(
    layout: str = typer.Argument("examples/local-dlm.yaml", help="layout YAML with a dlm pool"),
    rate: float = typer.Option(20.0, help="requests/s"),
    duration: float = typer.Option(60.0, help="seconds of arrivals"),
    trace: str = typer.Option("fixed:64:32", help="trace (as for `tandem sim run`)"),
    seed: int = typer.Option(0),
) -> None:
    """The docs/sim.md dlm-pool table: two sampler variants x one or two dlm workers, as markdown."""
    from sim.dlm_table import rows

    typer.echo("\n".join(rows(layout, rate, duration, trace, seed)))


def register(group: Callable[[str], typer.Typer]) -> None:
    group("").add_typer(sim_app, name="sim")
