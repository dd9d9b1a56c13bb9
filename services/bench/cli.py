"""Every `tandem bench AREA` verb, and the areas' evaluation and plot verbs (`tandem dlm|policy|fusion ...`),
registered in one place. The verb bodies live next to their benchmark (*_cli.py) and import torch themselves."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import typer

from services.bench import (
    dlm_cli,
    dlm_tools_cli,
    engine_cli,
    faults_cli,
    fusion_cli,
    kv_cli,
    overload_cli,
    policy_cli,
    soak_cli,
    verify_cli,
)

SIM_LAYOUT = Path(__file__).resolve().parents[2] / "examples/sim/splitwise-hh.yaml"


def bench_sim(
    trace: str = typer.Option("conv"),
    layout: Path = typer.Option(SIM_LAYOUT),
    repeats: int = typer.Option(3),
    reference: Path | None = typer.Option(None, help="a splitwise-sim checkout: also measure its CPU per "
                                          "request next to ours on one trace (benchmarks/sim_reference.py)"),
    reference_python: str = typer.Option("python", help="the Python with splitwise-sim's requirements"),
) -> None:
    """Simulated requests per CPU second replaying one hour of a trace (benchmarks/sim_speed.py)."""
    from sim.speed import reference_speed_table, speed_table

    typer.echo(speed_table(layout, trace, repeats))
    if reference is not None:
        typer.echo("")
        typer.echo(reference_speed_table(reference.resolve(), reference_python))


def register(group: Callable[[str], typer.Typer]) -> None:
    bench = group("bench")
    bench.command("engine")(engine_cli.bench_engine)
    bench.command("kv")(kv_cli.bench_kv)
    bench.command("fusion")(fusion_cli.bench_fusion)
    bench.command("dlm")(dlm_cli.bench_dlm)
    bench.command("policy")(policy_cli.bench_policy)
    bench.command("sim")(bench_sim)
    bench.command("faults")(faults_cli.bench_faults)
    bench.command("overload")(overload_cli.bench_overload)
    bench.command("soak")(soak_cli.bench_soak)
    bench.command("cluster")(verify_cli.bench_cluster_cmd)

    top = group("")  # the verify loop (issue 13): plan -> deploy -> verify
    top.command("profile")(verify_cli.profile_cmd)
    top.command("compare")(verify_cli.compare_cmd)
    top.command("demo")(verify_cli.demo_cmd)

    dlm = group("dlm")
    dlm.command("evaluate")(dlm_tools_cli.evaluate_cmd)
    dlm.command("profile")(dlm_tools_cli.profile_cmd)
    dlm.command("plots")(dlm_tools_cli.plots_cmd)
    dlm.command("table")(dlm_tools_cli.table_cmd)

    policy = group("policy")
    policy.command("schedule")(policy_cli.schedule)
    policy.command("screen")(policy_cli.screen_cmd)
    policy.command("flops")(policy_cli.flops_cmd)
    policy.command("plots")(policy_cli.plots_cmd)

    group("fusion").command("plots")(fusion_cli.plot_cmd)
