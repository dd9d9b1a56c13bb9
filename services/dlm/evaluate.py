"""Run the sampler variants side by side on the held-out eval set and score them: accuracy (exact match,
Wilson 95% CI), token agreement with the baseline, forward passes, tokens per step, linear work, time."""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch

from services.dlm.checkpoint import CHECKPOINT_DIR, load
from services.dlm.sampler import Options, sample
from services.dlm.tasks import encode_prompt, eval_set

VARIANTS = ("baseline", "freecache", "guided", "freecache_guided")
ABLATIONS = ("freecache_lag", "refresh_block", "parallel")


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return 0.0, 0.0
    p = k / n
    den = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return max(0.0, mid - half), min(1.0, mid + half)


def variant_options(name: str, base: Options) -> tuple[Options, bool]:
    """(options, uses_guide) for a named variant. `parallel` commits every draft of one DLM forward with no
    guide judging them (an accept-all guide): what Guided Diffusion is compared against."""
    table = {"baseline": ("off", False), "freecache": ("freecache", False),
             "freecache_lag": ("freecache_lag", False), "refresh_block": ("refresh_block", False),
             "guided": ("off", True), "freecache_guided": ("freecache", True), "parallel": ("off", True)}
    cache, guided = table[name]
    opts = replace(base, cache=cache)
    return (replace(opts, accept="all") if name == "parallel" else opts), guided


def evaluate(dlm: torch.nn.Module, guide: torch.nn.Module, tok, n: int, base: Options,
             variants: tuple[str, ...] = VARIANTS, progress: Callable[[str, int], None] | None = None) -> dict:
    examples = eval_set(n)
    prompts = [encode_prompt(tok, ex.prompt) for ex in examples]
    out, base_tokens = {}, None
    for name in variants:
        opts, guided = variant_options(name, base)
        toks, correct, stats, by_task = [], 0, [], {}
        t0 = time.perf_counter()
        for i, (ex, pr) in enumerate(zip(examples, prompts, strict=True)):
            res = sample(dlm, pr, opts, tok.mask_id, tok.eos_id, guide=guide if guided else None)
            toks.append(res.tokens)
            stats.append(res.stats)
            ok = tok.decode(res.tokens) == ex.answer
            correct += ok
            by_task.setdefault(ex.task, []).append(ok)
            if progress:
                progress(name, i)
        sec = time.perf_counter() - t0
        if base_tokens is None:
            base_tokens = toks
        agree = sum(a == b for t, u in zip(toks, base_tokens, strict=True) for a, b in zip(t, u, strict=True))
        total = sum(len(t) for t in toks)
        lo, hi = wilson(correct, n)
        steps = sum(s.steps for s in stats)
        out[name] = {
            "accuracy": correct / n, "accuracy_ci95": [lo, hi],
            "token_agreement": agree / total,
            "forward_passes": sum(s.forward_passes for s in stats) / n,
            "steps": steps / n,
            "tokens_per_step": total / steps,
            "dlm_tokens": sum(s.dlm_tokens for s in stats) / n,
            "guide_tokens": sum(s.guide_tokens for s in stats) / n,
            "seconds": sec,
            "accuracy_by_task": {k: sum(v) / len(v) for k, v in sorted(by_task.items())},
        }
    b = out[variants[0]]
    for r in out.values():
        r["speedup"] = b["seconds"] / r["seconds"]
        r["linear_work_reduction"] = b["dlm_tokens"] / r["dlm_tokens"]
    return out


def load_pair(ckpt_dir: Path = CHECKPOINT_DIR, device: str = "cpu", dlm_path: Path | None = None):
    dlm, tok, _ = load(dlm_path or ckpt_dir / "dlm.pt", device)
    guide, gtok, _ = load(ckpt_dir / "guide.pt", device)
    if gtok != tok:
        from services.errors import InvalidArgument

        raise InvalidArgument(f"guide: tokenizer {gtok.name} does not match the DLM's {tok.name}", param="guide")
    return dlm, guide, tok


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--ckpt", type=Path, default=CHECKPOINT_DIR)
    ap.add_argument("--n", type=int, default=150)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    torch.set_grad_enabled(False)
    dlm, guide, tok = load_pair(a.ckpt, a.device)
    res = evaluate(dlm, guide, tok, a.n, Options(), VARIANTS + ABLATIONS)
    text = json.dumps(res, indent=1)
    print(text)
    if a.out:
        a.out.write_text(text)


if __name__ == "__main__":
    main()
