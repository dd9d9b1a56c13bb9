"""`tandem dlm evaluate|profile|plots|table`: the DLM's studies beyond `tandem bench dlm` (B x s sweeps, the
simulator's latency profile, the docs' figures and tables)."""

from __future__ import annotations

import json
from pathlib import Path

import typer


def evaluate_cmd(
    checkpoint: Path | None = typer.Option(None, "--checkpoint", help="folder with dlm.pt and guide.pt"),
    ckpt: Path | None = typer.Option(None, "--ckpt", hidden=True, help="old spelling of --checkpoint"),
    dlm_file: Path | None = typer.Option(None, "--dlm", help="another DLM checkpoint file"),
    n: int = typer.Option(150, "--n", help="eval prompts"),
    seed: int | None = typer.Option(None, "--seed", help="eval-set seed (default: the held-out one, 12345; "
                                    "pick configurations on another seed)"),
    sweep: str | None = typer.Option(None, "--sweep", help="comma-separated BxS configurations, e.g. 4x4,6x6,8x8"),
    variants: str = typer.Option("baseline,freecache", "--variants", help="variants of a --sweep"),
    guide_chunk: int | None = typer.Option(None, "--guide-chunk", help="drafts the guide reads per forward (default 24)"),
    threads: int = typer.Option(1, "--threads", help="torch CPU threads"),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda"),
    json_out: Path | None = typer.Option(None, "--json", help="write the results here"),
    out: Path | None = typer.Option(None, "--out", hidden=True, help="old spelling of --json"),
    table: Path | None = typer.Option(None, "--table", help="print the markdown table of a saved sweep and exit"),
) -> None:
    """A B x s sweep of baseline and FreeCache on an eval set (--sweep), or every variant at the bench's B and s."""
    from services.bench import dlm_evaluate as ev

    if table:
        typer.echo(ev.sweep_table(json.loads(table.read_text())))
        return
    res = ev.run(checkpoint or ckpt, dlm_file, n, ev.EVAL_SEED if seed is None else seed, sweep, variants,
                 ev.BENCH_GUIDE_CHUNK if guide_chunk is None else guide_chunk, threads, device)
    text = json.dumps(res, indent=1)
    typer.echo(text)
    if json_out or out:
        (json_out or out).write_text(text)


def profile_cmd(
    json_out: Path = typer.Option(Path("sim/data/dlm_profile.json"), "--json", help="profile JSON to write (merged)"),
    out: Path | None = typer.Option(None, "--out", hidden=True, help="old spelling of --json"),
    hardware: str = typer.Option("cpu", "--hardware", help="the sim catalog's name for this machine (sim/catalog.py)"),
    n: int = typer.Option(30, "--n", min=1, help="measured requests per variant"),
    threads: int = typer.Option(1, "--threads", min=1, help="torch threads (the served default is 1)"),
) -> None:
    """Seconds per dlm request for each sampler variant on this machine: the simulator's dlm cost table."""
    from services.bench.dlm_profile import measure, write

    path = out or json_out
    entry = measure(n, threads)
    write(path, hardware, entry, f"tandem dlm profile --json {path} --hardware {hardware} --n {n} --threads {threads}")
    for name, v in entry["variants"].items():
        typer.echo(f"{name:18s} mean {v['mean_s'] * 1e3:7.2f} ms  p90 {v['p90_s'] * 1e3:7.2f} ms  "
                   f"forward passes {v['forward_passes_mean']:.1f}")
    typer.echo(f"wrote {path} ({hardware})")


def plots_cmd(
    files: list[Path] = typer.Argument(..., help="BENCH TIMING... OUTDIR: a `tandem bench dlm --json` result, "
                                       "timing JSONs (services/bench/dlm_timing.py), the folder for the PNGs"),
) -> None:
    """The docs/dlm.md figures (bench, timing, FreeCache scaling) and their markdown tables."""
    from services.contracts.errors import InvalidArgument

    if len(files) < 3:
        raise InvalidArgument("plots: give BENCH TIMING... OUTDIR (at least one timing JSON)", param="files")
    from services.bench.dlm_plots import render

    render(files[0], files[1:-1], files[-1])


def table_cmd(
    result: Path = typer.Argument(..., help="a `tandem bench dlm --json` result"),
    smollm2: bool = typer.Option(False, "--smollm2", help="the result is from `tandem bench dlm --smollm2`"),
) -> None:
    """The docs/dlm.md markdown table of a saved bench result."""
    out = json.loads(result.read_text())
    if smollm2:
        from services.bench.dlm_smol import markdown
    else:
        from services.bench.dlm_plots import bench_markdown as markdown
    typer.echo(markdown(out))
