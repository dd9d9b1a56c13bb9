"""Run the sampler variants side by side on the held-out eval set and score them: accuracy (exact match,
Wilson 95% CI), token agreement with the baseline, forward passes, tokens per step, linear work, time."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch

from services.bench.stats import wilson
from services.dlm.checkpoint import CHECKPOINT_DIR, load_pair
from services.dlm.protocol import ABLATIONS, VARIANT_OPTIONS, VARIANTS
from services.dlm.sampler import Options, sample, sample_batch
from services.dlm.tasks import encode_prompt, eval_set

# The bench's sampling configuration, shared by every variant: blocks of 2, one token per step. Chosen on a
# development set (seed 4242, `--sweep`), not the held-out one: at B=4, s=4 FreeCache lost 2-3 points on
# sorting; at B=2, s=2 it lost none with 3.43x less linear work (docs/dlm.md, "Choosing B and s").
BENCH_BLOCK, BENCH_STEPS = 2, 2
# How many drafts the guide reads per forward. It changes only cost, never which tokens are accepted (the
# accepted prefix is decided position by position); on the development seed the whole response (24) in one
# guide pass was fastest (docs/dlm.md). A guide that rejects early wastes the rest of a long chunk.
BENCH_GUIDE_CHUNK = 24
EVAL_SEED = 12345  # tasks.eval_set's held-out seed; configurations are chosen on other seeds


def agreement(tokens: list[list[int]], reference: list[list[int]]) -> float:
    """Fraction of response positions whose token equals the reference's, over all prompts."""
    same = sum(a == b for t, u in zip(tokens, reference, strict=True) for a, b in zip(t, u, strict=True))
    return same / sum(len(t) for t in tokens)


def variant_options(name: str, base: Options) -> tuple[Options, bool]:
    """(options, uses_guide) for a named variant of services.dlm.protocol.VARIANT_OPTIONS."""
    opts = dict(VARIANT_OPTIONS[name])
    guided = bool(opts.pop("guided"))
    return replace(base, **opts), guided


def evaluate(dlm: torch.nn.Module, guide: torch.nn.Module, tok, n: int, base: Options,
             variants: tuple[str, ...] = VARIANTS, progress: Callable[[str, int], None] | None = None,
             seed: int = EVAL_SEED) -> dict:
    examples = eval_set(n, seed=seed)
    prompts = [encode_prompt(tok, ex.prompt) for ex in examples]
    setups = {name: variant_options(name, base) for name in variants}
    toks = {v: [] for v in variants}
    stats = {v: [] for v in variants}
    ok = {v: [] for v in variants}
    sec = dict.fromkeys(variants, 0.0)
    # Variants take turns prompt by prompt, so load from other jobs on a shared CPU hits them all alike.
    for i, (ex, pr) in enumerate(zip(examples, prompts, strict=True)):
        for name, (opts, guided) in setups.items():
            t0 = time.perf_counter()
            res = sample(dlm, pr, opts, tok.mask_id, tok.eos_id, guide=guide if guided else None)
            sec[name] += time.perf_counter() - t0
            toks[name].append(res.tokens)
            stats[name].append(res.stats)
            ok[name].append(tok.decode(res.tokens) == ex.answer)
            if progress:
                progress(name, i)
    out, base_tokens = {}, toks[variants[0]]
    for name in variants:
        total = sum(len(t) for t in toks[name])
        correct = sum(ok[name])
        lo, hi = wilson(correct, n)
        st = stats[name]
        steps = sum(s.steps for s in st)
        by_task: dict[str, list[bool]] = {}
        for ex, good in zip(examples, ok[name], strict=True):
            by_task.setdefault(ex.task, []).append(good)
        out[name] = {
            "accuracy": correct / n, "accuracy_ci95": [lo, hi],
            "token_agreement": agreement(toks[name], base_tokens),
            "forward_passes": sum(s.forward_passes for s in st) / n,
            "steps": steps / n,
            "tokens_per_step": total / steps,
            "dlm_tokens": sum(s.dlm_tokens for s in st) / n,
            "guide_tokens": sum(s.guide_tokens for s in st) / n,
            "seconds": sec[name],
            "accuracy_by_task": {k: sum(v) / len(v) for k, v in sorted(by_task.items())},
        }
    return with_ratios(out, variants[0])


BATCH_VARIANTS = ("baseline", "freecache", "refresh_block")


def evaluate_batched(dlm: torch.nn.Module, tok, n: int, base: Options, batch: int,
                     variants: tuple[str, ...] = BATCH_VARIANTS, seed: int = EVAL_SEED,
                     progress: Callable[[str, int], None] | None = None) -> dict:
    """The block samplers on the same eval set, `batch` prompts per forward (all prompts are left-padded to
    one length): what a worker serving many requests at once would see. Variants take turns batch by batch."""
    examples = eval_set(n, seed=seed)
    prompts = [encode_prompt(tok, ex.prompt) for ex in examples]
    setups = {name: variant_options(name, base)[0] for name in variants}
    toks = {v: [] for v in variants}
    sec = dict.fromkeys(variants, 0.0)
    fwd = dict.fromkeys(variants, 0)
    pos = dict.fromkeys(variants, 0)
    for i in range(0, n, batch):
        chunk = prompts[i:i + batch]
        for name, opts in setups.items():
            t0 = time.perf_counter()
            res = sample_batch(dlm, chunk, opts, tok.mask_id, tok.eos_id)
            sec[name] += time.perf_counter() - t0
            toks[name] += [r.tokens for r in res]
            fwd[name] += res[0].stats.forward_passes
            pos[name] += res[0].stats.dlm_tokens * len(chunk)
            if progress:
                progress(name, i)
    out, base_tokens = {}, toks[variants[0]]
    for name in variants:
        correct = sum(tok.decode(t) == ex.answer for t, ex in zip(toks[name], examples, strict=True))
        out[name] = {"accuracy": correct / n, "accuracy_ci95": list(wilson(correct, n)),
                     "token_agreement": agreement(toks[name], base_tokens),
                     "forward_passes": fwd[name], "dlm_tokens": pos[name] / n, "seconds": sec[name],
                     "tokens_per_s": n * base.gen_len / sec[name]}
    for r in out.values():
        r["speedup"] = out[variants[0]]["seconds"] / r["seconds"]
        r["linear_work_reduction"] = out[variants[0]]["dlm_tokens"] / r["dlm_tokens"]
    return {"batch": batch, "n": n, **out}



def sweep(dlm: torch.nn.Module, guide: torch.nn.Module, tok, n: int, configs: list[tuple[int, int]],
          variants: tuple[str, ...], seed: int, guide_chunk: int = BENCH_GUIDE_CHUNK) -> dict:
    """Block size B and steps per block s, shared by every variant: accuracy per task and linear work."""
    out = {}
    for b, s in configs:
        res = evaluate(dlm, guide, tok, n, Options(block=b, steps_per_block=s, guide_chunk=guide_chunk), variants,
                       seed=seed)
        out[f"B{b}_s{s}"] = {v: {k: r[k] for k in ("accuracy", "accuracy_ci95", "accuracy_by_task", "token_agreement",
                                                   "linear_work_reduction", "seconds", "speedup", "guide_tokens")}
                             for v, r in res.items()}
        print(f"B={b} s={s}: " + "  ".join(
            f"{v} {r['accuracy']:.3f} {r['accuracy_by_task']} lw {r['linear_work_reduction']:.2f}x"
            for v, r in res.items()), flush=True)
    return out


def sweep_table(res: dict) -> str:
    """Markdown rows for docs/dlm.md from `sweep`'s output (baseline vs FreeCache per configuration)."""
    rows = ["| B | s | N | baseline | FreeCache [95% CI] | FreeCache sort | points lost | linear work | formula |",
            "|---|---|---|---|---|---|---|---|---|"]
    for key, r in res.items():
        b, s = (int(v[1:]) for v in key.split("_"))
        nb, base, fc = 24 // b, r["baseline"], r["freecache"]
        lo, hi = fc["accuracy_ci95"]
        rows.append(f"| {b} | {s} | {nb} | {base['accuracy']:.3f} | {fc['accuracy']:.3f} [{lo:.3f}, {hi:.3f}] | "
                    f"{fc['accuracy_by_task']['sort']:.2f} | {100 * (base['accuracy'] - fc['accuracy']):+.1f} | "
                    f"{fc['linear_work_reduction']:.2f}x | {2 * 48 * nb / (24 * (nb + 1)):.2f}x |")
    return "\n".join(rows)


def run(ckpt: Path | None, dlm_path: Path | None, n: int, seed: int, sweep_text: str | None, variants: str,
        guide_chunk: int, threads: int, device: str) -> dict:
    """`tandem dlm evaluate`: a B x s sweep (`sweep_text` "BxS,..."), or every variant at the bench's B and s."""
    torch.set_grad_enabled(False)
    torch.set_num_threads(threads)
    dlm, guide, tok = load_pair(ckpt or CHECKPOINT_DIR, device, dlm_path=dlm_path)
    if sweep_text:
        cfgs = [tuple(int(v) for v in c.split("x")) for c in sweep_text.split(",")]
        names = tuple(variants.split(","))
        res = sweep(dlm, guide, tok, n, cfgs, names, seed, guide_chunk)
        if {"baseline", "freecache"} <= set(names):
            print(sweep_table(res))
        return res
    return evaluate(dlm, guide, tok, n, Options(block=BENCH_BLOCK, steps_per_block=BENCH_STEPS, guide_chunk=guide_chunk),
                    VARIANTS + ABLATIONS, seed=seed)


def with_ratios(out: dict, base: str) -> dict:
    """Add each variant's wall-clock `speedup` and `linear_work_reduction` against the `base` variant."""
    b = out[base]
    for r in out.values():
        r["speedup"] = b["seconds"] / r["seconds"]
        r["linear_work_reduction"] = b["dlm_tokens"] / r["dlm_tokens"]
    return out
