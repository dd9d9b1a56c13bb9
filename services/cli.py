"""The `tandem` command: one verb per job; each area registers its own verbs in one way.

Every area module exposes `register(group)`: `group("")` is the `tandem` app itself, `group("bench")`,
`group("sim")`, ... the sub-command groups (created on first use). Verb bodies import their heavy
dependencies (torch) themselves, so `tandem --help` loads none of them.

The verb scheme: `tandem bench AREA` (an area's benchmark), `tandem AREA train` (training), `tandem AREA VERB`
(an area's other tools: plots, sweeps, profiles), plus `generate`, `up`, `serve`, `compose` at the top.
"""

from __future__ import annotations

import importlib
import sys

import typer

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Plan, run and verify LLM inference clusters.")

GROUPS = {
    "bench": "Component and cluster benchmarks (one per area).",
    "dlm": "Diffusion language model: training, sweeps, latency profiles and plots.",
    "policy": "Diffusion policy with Block-wise Adaptive Caching: training, schedules, screens and plots.",
    "fusion": "Temporal fusion batching: plots from `tandem bench fusion` results.",
}
_groups: dict[str, typer.Typer] = {"": app}


def group(name: str) -> typer.Typer:
    """The `tandem NAME` sub-command group ("" = the top level), created on first use."""
    if name not in _groups:
        _groups[name] = typer.Typer(no_args_is_help=True, help=GROUPS[name])
        app.add_typer(_groups[name], name=name)
    return _groups[name]


bench_app = group("bench")

# The areas, in the order their verbs appear; a missing area (a slim install) is skipped.
AREAS = [
    "services.engine.cli",
    "services.cluster.cli",
    "services.bench.cli",
    "services.train.cli",
    "sim.cli",
]


def _register_areas() -> None:
    for name in AREAS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name and (name == exc.name or name.startswith(exc.name + ".")):  # area not built yet
                continue
            raise
        module.register(group)


_register_areas()


def main() -> None:
    from services.contracts.errors import TandemError

    try:
        app()
    except TandemError as exc:
        typer.secho(f"error: {exc.message}", fg="red", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
