"""`tandem bench dlm`: baseline vs FreeCache vs Guided vs both on the held-out task set, plus exactness."""

from __future__ import annotations

import json
from pathlib import Path

import typer


def bench_dlm(
    quick: bool = typer.Option(False, "--quick", help="small eval set (30 prompts), for CI and checks"),
    json_out: Path | None = typer.Option(None, "--json", help="write the results here"),
    n: int | None = typer.Option(None, "--n", help="eval prompts (default 30 quick, 300 full)"),
    checkpoint: Path | None = typer.Option(None, "--checkpoint", help="folder with dlm.pt and guide.pt"),
    ckpt: Path | None = typer.Option(None, "--ckpt", hidden=True, help="old spelling of --checkpoint"),
    dlm_file: Path | None = typer.Option(None, "--dlm", help="another DLM checkpoint (e.g. checkpoints/dlm_weak.pt)"),
    block: int | None = typer.Option(None, "--block", help="block length B (default 2; 4 with --smollm2)"),
    steps: int | None = typer.Option(None, "--steps", help="denoising steps per block (default 2; 4 with --smollm2)"),
    accept: str = typer.Option("topk_rel", "--accept", help="top1 | topk | topk_rel"),
    guide_chunk: int | None = typer.Option(None, "--guide-chunk", help="drafts the guide reads per forward "
                                           "(default 24 = the whole response; not with --smollm2, whose chunk is the block)"),
    exact_prompts: int = typer.Option(3, "--exact-prompts", help="prompts for the exactness checks"),
    threads: int = typer.Option(1, "--threads", help="torch CPU threads (batch-1 forwards of a tiny model)"),
    batch: int = typer.Option(50, "--batch", help="also run baseline / FreeCache / refresh_block this many "
                              "prompts per forward (the 'batched' table); 0 skips it"),
    smollm2: bool = typer.Option(False, "--smollm2", help="the real-tokenizer path: the SmolLM2-tokenizer DLM "
                                 "(checkpoints/dlm_smollm2.pt) guided by SmolLM2-135M (default n 20 quick, 200 full)"),
    guide_preamble: bool = typer.Option(True, "--guide-preamble/--no-guide-preamble",
                                        help="with --smollm2: worked examples the guide reads before each prompt"),
) -> None:
    """Accuracy (95% CI), token agreement, forward passes, tokens/step, linear work and time per variant."""
    import torch
    from rich.console import Console
    from rich.progress import Progress

    from services.bench.dlm_evaluate import (
        ABLATIONS,
        BATCH_VARIANTS,
        BENCH_BLOCK,
        BENCH_GUIDE_CHUNK,
        BENCH_STEPS,
        VARIANTS,
        evaluate,
        evaluate_batched,
        load_pair,
    )
    from services.bench.dlm_exact import run_checks
    from services.contracts.errors import InvalidArgument
    from services.dlm.checkpoint import CHECKPOINT_DIR
    from services.dlm.sampler import Options
    from services.dlm.tasks import GEN_LEN, encode_prompt, eval_set

    ckpt = checkpoint or ckpt
    count = n if n is not None else (30 if quick else 300)
    if count < 1:
        raise InvalidArgument("--n: must be at least 1", param="n")
    if batch < 0:
        raise InvalidArgument("--batch: must be 0 (off) or a positive batch size", param="batch")
    torch.set_grad_enabled(False)
    torch.set_num_threads(threads)
    if smollm2:
        if guide_chunk is not None:
            raise InvalidArgument("--guide-chunk: with --smollm2 the guide reads one block per forward",
                                  param="guide_chunk")
        block, steps = 4 if block is None else block, 4 if steps is None else steps
        _bench_smol(n if n is not None else (20 if quick else 200), json_out, dlm_file, block, steps, accept,
                    exact_prompts, guide_preamble)
        return
    block = BENCH_BLOCK if block is None else block
    steps = BENCH_STEPS if steps is None else steps
    dlm, guide, tok = load_pair(ckpt or CHECKPOINT_DIR, dlm_path=dlm_file)
    opts = Options(gen_len=GEN_LEN, block=block, steps_per_block=steps, accept=accept,
                   guide_chunk=BENCH_GUIDE_CHUNK if guide_chunk is None else guide_chunk)
    opts.validate(dlm.cfg.max_len, dlm.cfg.max_len - GEN_LEN)
    names = VARIANTS + ABLATIONS
    with Progress(transient=True) as prog:
        task = prog.add_task("dlm bench", total=count * len(names))
        res = evaluate(dlm, guide, tok, count, opts, names, progress=lambda _v, _i: prog.advance(task))
        if batch:
            size = min(batch, count)
            task = prog.add_task(f"dlm bench, batches of {size}", total=-(-count // size) * len(BATCH_VARIANTS))
            res["batched"] = evaluate_batched(dlm, tok, count, opts, size,
                                              progress=lambda _v, _i: prog.advance(task))
    prompts = [encode_prompt(tok, ex.prompt) for ex in eval_set(exact_prompts, seed=777)]
    checks = run_checks(dlm, guide, prompts, opts, tok.mask_id, tok.eos_id)
    p, g = dlm.cfg.max_len - GEN_LEN, GEN_LEN
    nb = g // block
    out = {**res, "exact_checks": checks,
           "config": {"n": count, "dlm": str(dlm_file or "dlm.pt"), "prompt_len": p, "gen_len": g, "block": block, "steps_per_block": steps,
                      "accept": accept, "k": opts.k, "tau": opts.tau, "guide_chunk": opts.guide_chunk,
                      "formula_linear_work_reduction": 2 * (p + g) * nb / (g * (nb + 1)),
                      "threads": torch.get_num_threads()}}
    _print(Console(width=max(Console().width, 120)), out, names)
    if json_out:
        json_out.write_text(json.dumps(out, indent=1))


def _bench_smol(n: int, json_out: Path | None, dlm_file: Path | None, block: int, steps: int, accept: str,
                exact_prompts: int, guide_preamble: bool = True) -> None:
    from rich.console import Console
    from rich.progress import Progress

    from services.bench.dlm_smol import VARIANTS, bench, print_table
    from services.contracts.errors import InvalidArgument

    if n < 1:
        raise InvalidArgument("--n: must be at least 1", param="n")
    with Progress(transient=True) as prog:
        task = prog.add_task("dlm bench (SmolLM2)", total=n * len(VARIANTS))
        out = bench(n, block=block, steps=steps, accept=accept, exact_prompts=exact_prompts, ckpt=dlm_file,
                    guide_preamble=guide_preamble, progress=lambda _v, _i: prog.advance(task))
    print_table(Console(width=max(Console().width, 120)), out)
    if json_out:
        json_out.write_text(json.dumps(out, indent=1))


def _print(console, out: dict, names: tuple[str, ...]) -> None:
    from rich.table import Table

    t = Table(title=f"tandem bench dlm (n={out['config']['n']}, CPU)")
    for col in ("variant", "accuracy [95% CI]", "agree", "fwd", "tok/step", "linear work", "s", "speed-up"):
        t.add_column(col)
    for name in names:
        r = out[name]
        lo, hi = r["accuracy_ci95"]
        t.add_row(name, f"{r['accuracy']:.3f} [{lo:.3f}, {hi:.3f}]", f"{r['token_agreement']:.3f}",
                  f"{r['forward_passes']:.1f}", f"{r['tokens_per_step']:.2f}",
                  f"{r['linear_work_reduction']:.2f}x", f"{r['seconds']:.2f}", f"{r['speedup']:.2f}x")
    console.print(t)
    console.print(f"formula 2(P+G)N/(G(N+1)) = {out['config']['formula_linear_work_reduction']:.2f}x")
    if "batched" in out:
        bt = out["batched"]
        t = Table(title=f"batched: {bt['batch']} prompts per forward")
        for col in ("variant", "accuracy [95% CI]", "agree", "linear work", "s", "tokens/s", "speed-up"):
            t.add_column(col)
        for name, r in bt.items():
            if isinstance(r, dict):
                lo, hi = r["accuracy_ci95"]
                t.add_row(name, f"{r['accuracy']:.3f} [{lo:.3f}, {hi:.3f}]", f"{r['token_agreement']:.3f}",
                          f"{r['linear_work_reduction']:.2f}x", f"{r['seconds']:.2f}", f"{r['tokens_per_s']:.0f}",
                          f"{r['speedup']:.2f}x")
        console.print(t)
    console.print("exact checks: " + ", ".join(f"{k}={'PASS' if v else 'FAIL'}" for k, v in out["exact_checks"].items()))
