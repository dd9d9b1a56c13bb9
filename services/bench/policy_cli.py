"""`tandem bench policy` and `tandem policy schedule|screen|flops|plots`; torch is imported inside the verbs."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import typer

SUMMARY_KEYS = ("success_rate", "action_mse", "block_evals", "seconds")


def _table(rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table("config", "block evals", "saved", "MSE vs uncached", "MSE held-out", "success [95% CI]", "ms/chunk",
              "speed-up")
    for r in rows:
        lo, hi = r["success_ci95"]
        t.add_row(r["config"], str(r["block_evals"]), f"{r['evals_saved']:.0%}", f"{r['action_mse']:.2e}",
                  f"{r['action_mse_heldout']:.2e}", f"{r['success_rate']:.3f} [{lo:.3f}, {hi:.3f}]",
                  f"{r['seconds'] * 1e3:.1f}", f"{r['speedup']:.2f}x")
    Console().print(t)


def bench_policy(
    quick: bool = typer.Option(False, "--quick", help="uncached / uniform / bac at one budget, few episodes"),
    json_path: Path | None = typer.Option(None, "--json", help="write the results here"),
    checkpoint: Path | None = typer.Option(None, help="checkpoint directory (default: the committed one)"),
    budget: int = typer.Option(10, help="update budget S for --quick"),
    episodes: int | None = typer.Option(None, help="rollouts per config (default 16 quick, 50 full)"),
    reps: int | None = typer.Option(None, help="batch-1 latency repetitions (default 3 quick, 10 full)"),
    threads: int = typer.Option(2, help="torch CPU threads"),
    server: bool = typer.Option(False, "--server", help="instead: load the real gRPC server with 1..N clients"),
    clients: str = typer.Option("1,4,16", help="--server: comma-separated concurrent client counts"),
    seconds: float = typer.Option(10.0, help="--server: seconds of closed-loop load per client count"),
    cache: str = typer.Option("bac", help="--server: schedule the server uses (bac, bac-n17, uniform, uncached)"),
) -> None:
    """Uncached vs uniform vs BAC on the same checkpoint, noise and scenes; JSON keys per method."""
    import torch

    from services.bench import policy as bench
    from services.contracts.errors import InvalidArgument
    from services.policy import checkpoint as ckpt

    torch.set_num_threads(threads)
    model, norm, meta = ckpt.load(checkpoint)
    schedules = ckpt.load_schedules(checkpoint)
    if not schedules:
        raise InvalidArgument("checkpoint: no schedules.json; run `tandem policy schedule` first", param="checkpoint")
    if str(budget) not in schedules.get("ddpm100", {}):
        raise InvalidArgument(f"budget: no schedule for S={budget}; have {sorted(schedules['ddpm100'])}", param="budget")
    if server:
        _bench_server(checkpoint, budget, [int(c) for c in clients.split(",")], seconds, cache, threads, json_path)
        return
    configs = bench.quick_configs(budget) if quick else bench.full_configs()
    episodes = episodes or (16 if quick else 50)
    reps = reps or (3 if quick else 10)
    t0 = time.time()
    checks = bench.exact_checks(model, norm, schedules)
    rows = bench.run_table(model, norm, schedules, configs, episodes, reps, n_mse=16 if quick else 64,
                           progress=lambda s: typer.echo(s, err=True))
    _table(rows)
    out: dict = {"command": " ".join(["tandem", *sys.argv[1:]]), "device": "cpu", "threads": threads, "checkpoint_sha256": meta["sha256"], "episodes": episodes,
                 "exact_checks": checks, "rows": rows, "wall_seconds": round(time.time() - t0, 1)}
    for r in rows:
        if r["sampler"] == "ddpm100" and r["method"] in ("uncached", "uniform", "bac") and r["budget"] in (None, budget):
            out[r["method"]] = {k: r[k] for k in SUMMARY_KEYS} | {"budget": r["budget"]}
    typer.echo(f"exact checks: {checks}")
    if json_path is not None:
        json_path.write_text(json.dumps(out, indent=1))
        typer.echo(f"wrote {json_path}")


def _bench_server(checkpoint: Path | None, budget: int, clients: list[int], seconds: float, cache: str,
                  threads: int, json_path: Path | None) -> None:
    from rich.console import Console
    from rich.table import Table

    from services.bench import policy_load as loadbench

    t0 = time.time()
    doc = loadbench.run(str(checkpoint) if checkpoint else None, clients, seconds, cache=cache, budget=budget)
    t = Table("clients", "requests", "chunks/s", "actions/s", "p50 ms", "p95 ms", "mean batch / pass", "max batch",
              "batch sizes (responses)")
    for r in doc["rows"]:
        t.add_row(str(r["clients"]), str(r["requests"]), f"{r['chunks_per_s']:.1f}", f"{r['actions_per_s']:.0f}",
                  f"{r['latency_p50_ms']:.1f}", f"{r['latency_p95_ms']:.1f}", f"{r['mean_batch_per_pass']:.2f}",
                  str(r["max_batch"]), " ".join(f"{b}:{c}" for b, c in r["batch_histogram"].items()))
    Console().print(t)
    typer.echo("in-process denoising pass, ms by batch size: "
               + ", ".join(f"{b}: {ms:.1f}" for b, ms in doc["direct_pass_ms"].items()))
    doc |= {"command": " ".join(["tandem", *sys.argv[1:]]), "device": "cpu", "threads": threads,
            "wall_seconds": round(time.time() - t0, 1)}
    if json_path is not None:
        json_path.write_text(json.dumps(doc, indent=1))
        typer.echo(f"wrote {json_path}")


def schedule(
    checkpoint: Path | None = typer.Option(None, help="checkpoint directory (default: the committed one)"),
    calib_obs: int = typer.Option(16, help="calibration observations recorded"),
    top_n: int = typer.Option(3, help="blocks the Bubbling Union refreshes in the `bac` schedules"),
    bu_width: list[int] | None = typer.Option(None, "--bu-width",
                                              help="extra BU widths, each stored as bac-n{w} (default: 9 and 17)"),
    threads: int = typer.Option(2, help="torch CPU threads"),
) -> None:
    """Record an uncached run, then write ACS, BAC (+ wider-BU variants), unified and uniform schedules."""
    import torch

    from services.bench import policy as bench
    from services.policy import checkpoint as ckpt

    torch.set_num_threads(threads)
    model, norm, _ = ckpt.load(checkpoint)
    schedules = bench.compute_schedules(model, norm, n_obs=calib_obs, top_n=top_n,
                                        widths=tuple(bu_width) if bu_width else bench.BU_WIDTHS)
    path = Path(checkpoint or ckpt.DEFAULT_DIR) / ckpt.SCHEDULES
    path.write_text(json.dumps(schedules))
    for key, per in schedules.items():
        for s, plans in per.items():
            evals = {m: sum(len(x) for x in v["steps"]) for m, v in plans.items()}
            typer.echo(f"{key} S={s}: block evals {evals}; BU blocks {plans['bac']['bu_blocks']}")
    typer.echo(f"wrote {path}")


def screen_cmd(
    budgets: str = typer.Option("8,9,10,11,12,13,14,15,16", help="comma-separated update budgets S"),
    widths: str = typer.Option("3,6,9,12,15,17", help="comma-separated Bubbling-Union widths n (17 = all upstream)"),
    uniform: str = typer.Option("16,18,20,21,22", help="comma-separated uniform budgets to compare"),
    dev_episodes: int = typer.Option(0, help="also roll out this many episodes on dev scenes (seed 2000)"),
    json_path: Path | None = typer.Option(None, "--json", help="write the rows here"),
    checkpoint: Path | None = typer.Option(None, help="checkpoint directory (default: the committed one)"),
    threads: int = typer.Option(2, help="torch CPU threads"),
) -> None:
    """CPU screen of BAC (S, BU width) by block evaluations and per-observation action MSE (DDPM-100)."""
    import torch

    from services.bench import policy as bench
    from services.policy import checkpoint as ckpt

    torch.set_num_threads(threads)
    model, norm, meta = ckpt.load(checkpoint)

    def ints(text: str) -> list[int]:
        return [int(x) for x in text.split(",") if x]

    rows = bench.screen(model, norm, ints(budgets), ints(widths), ints(uniform), dev_episodes=dev_episodes,
                        progress=lambda m: typer.echo(m, err=True))
    dev = any("dev_success" in r for r in rows)
    typer.echo("| config | block evals | MSE mean | MSE median | MSE p90 | flips (>1e-2) |"
               + (" dev success [95% CI] |" if dev else "") + "\n|---|---|---|---|---|---|" + ("---|" if dev else ""))
    for r in sorted(rows, key=lambda r: r["block_evals"]):
        line = (f"| {r['config']} | {r['block_evals']} | {r['mse_mean']:.1e} | {r['mse_median']:.1e} | "
                f"{r['mse_p90']:.1e} | {r['flips']}/{r['n_obs']} |")
        if dev:
            line += (f" {r['dev_success']:.3f} [{r['dev_ci95'][0]:.3f}, {r['dev_ci95'][1]:.3f}] |"
                     if "dev_success" in r else " – |")
        typer.echo(line)
    if json_path is not None:
        json_path.write_text(json.dumps({"command": " ".join(["tandem", *sys.argv[1:]]), "threads": threads,
                                         "checkpoint_sha256": meta["sha256"], "rows": rows}, indent=1))
        typer.echo(f"wrote {json_path}", err=True)


def flops_cmd(checkpoint: Path | None = typer.Option(None, help="checkpoint directory (default: the committed one)")) -> None:
    """FLOPs per batch-1 chunk for every benchmark config, and the reduction vs uncached DDPM-100."""
    from services.bench import policy as bench
    from services.policy import checkpoint as ckpt

    model, norm, _ = ckpt.load(checkpoint)
    flops = bench.chunk_flops(model, norm, ckpt.load_schedules(checkpoint), bench.full_configs())
    base = flops["ddpm100/uncached"]
    typer.echo("| config | MFLOP per chunk | fewer FLOPs |\n|---|---|---|")
    for name, f in flops.items():
        typer.echo(f"| {name} | {f / 1e6:.1f} | {base / f:.2f}x |")


def plots_cmd(
    table: list[Path] = typer.Option(..., help="table JSON(s) from `tandem bench policy --json` or the GPU runs "
                                               "(repeat the flag to merge runs in the trade-off figure)"),
    out_dir: Path = typer.Option(Path("docs/results/policy"), "--out-dir", help="folder for the PNGs"),
    out: Path | None = typer.Option(None, "--out", hidden=True, help="old spelling of --out-dir"),
    checkpoint: Path | None = typer.Option(None, help="checkpoint directory (default: the committed one)"),
) -> None:
    """PNGs (similarity, schedules, trade-off) for docs/policy.md; prints the table as Markdown."""
    import torch

    from services.bench import policy_plots as plots

    torch.set_num_threads(2)
    for path in plots.all_figures(out or out_dir, table, str(checkpoint) if checkpoint else None):
        typer.echo(f"wrote {path}", err=True)
    for t in table:
        typer.echo(f"{t}:\n" + plots.markdown_table(json.loads(t.read_text())))

