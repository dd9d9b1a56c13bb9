"""The `tandem` command: one verb per job; each area registers its own verbs."""

from __future__ import annotations

import importlib
import sys

import typer

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Plan, run and verify LLM inference clusters.")
bench_app = typer.Typer(no_args_is_help=True, help="Component and cluster benchmarks.")
app.add_typer(bench_app, name="bench")

# Each area module exposes `register(app, bench_app)`; heavy imports (torch) stay inside the verbs.
AREAS = [
    "services.engine.cli",
    "services.cluster.cli",
    "services.bench.fusion_cli",
    "services.bench.kv_cli",
    "services.bench.dlm_cli",
    "services.bench.policy_cli",
    "services.bench.verify_cli",
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
        module.register(app, bench_app)


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
