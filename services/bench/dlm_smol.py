"""`tandem bench dlm --smollm2`: the real-tokenizer path, side by side on the held-out text tasks — the
SmolLM2-tokenizer DLM alone, and guided by SmolLM2-135M-Instruct itself (Tandem's engine) — plus exactness."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch

from services.bench.dlm_evaluate import agreement, variant_options, with_ratios
from services.bench.dlm_exact import run_checks
from services.bench.stats import wilson
from services.dlm import protocol
from services.dlm.sampler import Options, sample
from services.dlm.smol import SMOL_CHECKPOINT, SmolBridge, load
from services.dlm.smol_tasks import GEN_LEN, PROMPT_LEN, eval_set, preamble

VARIANTS = (*protocol.VARIANTS, "parallel")


def load_smol_pair(path: Path = SMOL_CHECKPOINT, *, guide_preamble: bool = True):
    """(DLM behind the bridge, SmolLM2 guide, bridge, SmolLM2 tokenizer)."""
    from services.dlm.engine_guide import EngineGuide
    from services.engine import load_engine

    dlm, bridge, _ = load(path)
    engine = load_engine(device="cpu")
    guide = EngineGuide(engine, preamble=preamble() if guide_preamble else "", skip_ids=(bridge.pad_id,))
    return dlm, guide, bridge, engine.tokenizer


def evaluate_smol(dlm, guide, bridge: SmolBridge, tok, n: int, base: Options,
                  variants: tuple[str, ...] = VARIANTS,
                  progress: Callable[[str, int], None] | None = None) -> dict:
    examples = eval_set(n)
    prompts = [bridge.encode_prompt(tok, ex.prompt) for ex in examples]
    out, base_tokens = {}, None
    for name in variants:
        opts, guided = variant_options(name, base)
        toks, stats, by_task = [], [], {}
        t0 = time.perf_counter()
        for i, (ex, pr) in enumerate(zip(examples, prompts, strict=True)):
            res = sample(dlm, pr, opts, bridge.mask_id, bridge.eos_id, guide=guide if guided else None)
            toks.append(res.tokens)
            stats.append(res.stats)
            by_task.setdefault(ex.task, []).append(bridge.decode(tok, res.tokens) == ex.answer)
            if progress:
                progress(name, i)
        sec = time.perf_counter() - t0
        base_tokens = base_tokens or toks
        correct = sum(sum(v) for v in by_task.values())
        steps = sum(s.steps for s in stats)
        out[name] = {
            "accuracy": correct / n, "accuracy_ci95": list(wilson(correct, n)),
            "token_agreement": agreement(toks, base_tokens),
            "forward_passes": sum(s.forward_passes for s in stats) / n,
            "guide_forward_passes": sum(s.guide_passes for s in stats) / n,
            "guide_tokens": sum(s.guide_tokens for s in stats) / n,
            "steps": steps / n, "tokens_per_step": sum(len(t) for t in toks) / steps,
            "dlm_tokens": sum(s.dlm_tokens for s in stats) / n,
            "seconds": sec,
            "accuracy_by_task": {k: sum(v) / len(v) for k, v in sorted(by_task.items())},
        }
    return with_ratios(out, variants[0])


def bench(n: int, *, block: int = 4, steps: int = 4, accept: str = "topk_rel", exact_prompts: int = 3,
          ckpt: Path | None = None, guide_preamble: bool = True,
          progress: Callable[[str, int], None] | None = None) -> dict:
    opts = Options(gen_len=GEN_LEN, block=block, steps_per_block=steps, accept=accept, guide_chunk=block)
    opts.validate(PROMPT_LEN + GEN_LEN, PROMPT_LEN)  # bad flags fail before SmolLM2 is loaded
    dlm, guide, bridge, tok = load_smol_pair(ckpt or SMOL_CHECKPOINT, guide_preamble=guide_preamble)
    opts.validate(dlm.cfg.max_len, PROMPT_LEN)
    res = evaluate_smol(dlm, guide, bridge, tok, n, opts, progress=progress)
    prompts = [bridge.encode_prompt(tok, ex.prompt) for ex in eval_set(exact_prompts, seed=777)]
    checks = run_checks(dlm, guide, prompts, opts, bridge.mask_id, bridge.eos_id)
    return {**res, "exact_checks": checks,
            "config": {"n": n, "dlm": str(ckpt or SMOL_CHECKPOINT.name), "guide": "SmolLM2-135M-Instruct (engine)",
                       "guide_preamble": guide_preamble, "prompt_len": PROMPT_LEN, "gen_len": GEN_LEN,
                       "block": block, "steps_per_block": steps, "accept": accept, "k": opts.k, "tau": opts.tau,
                       "dlm_table_ids": len(bridge.ids), "threads": torch.get_num_threads()}}


def print_table(console, out: dict) -> None:
    from rich.table import Table

    t = Table(title=f"tandem bench dlm --smollm2 (n={out['config']['n']}, CPU)")
    for col in ("variant", "accuracy [95% CI]", "agree", "DLM fwd", "guide fwd", "tok/step", "s", "speed-up"):
        t.add_column(col)
    for name in VARIANTS:
        r = out[name]
        lo, hi = r["accuracy_ci95"]
        t.add_row(name, f"{r['accuracy']:.3f} [{lo:.3f}, {hi:.3f}]", f"{r['token_agreement']:.3f}",
                  f"{r['forward_passes']:.1f}", f"{r['guide_forward_passes']:.1f}", f"{r['tokens_per_step']:.2f}",
                  f"{r['seconds']:.2f}", f"{r['speedup']:.2f}x")
    console.print(t)
    console.print("exact checks: " + ", ".join(f"{k}={'PASS' if v else 'FAIL'}" for k, v in out["exact_checks"].items()))


def markdown(out: dict) -> str:
    """The docs table, from a bench JSON: `tandem dlm table --smollm2 docs/results/dlm/bench_cpu_smollm2.json`."""
    head = ("| variant | accuracy [95% CI] | per task (copy/rev/sort/add) | token agreement | DLM forwards | "
            "guide forwards | guide tokens | tokens/step | seconds | speed-up |")
    rows = [head, "|" + "---|" * 10]
    for name in VARIANTS:
        r = out[name]
        lo, hi = r["accuracy_ci95"]
        per = "/".join(f"{r['accuracy_by_task'][t]:.2f}" for t in ("copy", "rev", "sort", "add"))
        rows.append(f"| {name} | {r['accuracy']:.3f} [{lo:.3f}, {hi:.3f}] | {per} | {r['token_agreement']:.4f} | "
                    f"{r['forward_passes']:.2f} | {r['guide_forward_passes']:.2f} | {r['guide_tokens']:.1f} | "
                    f"{r['tokens_per_step']:.2f} | {r['seconds']:.1f} | {r['speedup']:.2f}x |")
    return "\n".join(rows)

