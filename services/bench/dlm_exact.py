"""Exactness checks shared by the tests and `tandem bench dlm`: each returns True only when the optimized
path reproduces its reference token for token."""

from __future__ import annotations

from dataclasses import replace

import torch

from services.dlm.guide import ARGuide
from services.dlm.model import DiffusionLM, WindowKV
from services.dlm.sampler import Options, sample


@torch.inference_mode()
def reference_generate(model: DiffusionLM, prompt: list[int], gen_len: int, block: int, steps: int,
                       mask_id: int) -> list[int]:
    """LLaDA's loop written as plainly as possible and independently of sampler.py: full forward each step,
    greedy tokens, the most confident masked positions of the current block are unmasked."""
    x = prompt + [mask_id] * gen_len
    p = len(prompt)
    per_step = [block // steps + (1 if i < block % steps else 0) for i in range(steps)]
    for start in range(p, p + gen_len, block):
        for n in per_step:
            probs = model(torch.tensor([x], device=model.embed.weight.device))[0].softmax(-1)
            cands = sorted(((float(probs[i].max()), -i, i) for i in range(start, start + block) if x[i] == mask_id),
                           reverse=True)
            for _, _, i in cands[:n]:
                x[i] = int(probs[i].argmax())
    return x[p:]


@torch.inference_mode()
def all_drafts(model: DiffusionLM, prompt: list[int], gen_len: int, mask_id: int, eos_id: int) -> list[int]:
    """What an accept-all guide must produce: one forward, every draft committed left to right, EOS fills."""
    x = torch.tensor([prompt + [mask_id] * gen_len], device=model.embed.weight.device)
    out = model(x)[0, len(prompt):].argmax(-1).tolist()
    if eos_id in out:
        k = out.index(eos_id)
        out = out[:k] + [eos_id] * (gen_len - k)
    return out


@torch.inference_mode()
def window_matches_full(model: DiffusionLM, prompt: list[int], gen_len: int, mask_id: int) -> bool:
    """With a fresh K/V store, the windowed forward gives the full forward's logits (float tolerance)."""
    x = torch.tensor([prompt + [mask_id] * gen_len], device=model.embed.weight.device)
    full = model(x)
    store = WindowKV(model.cfg, 1, x.shape[1], x.device, model.embed.weight.dtype)
    model.forward_window(x, 0, store)
    start = len(prompt)
    win = model.forward_window(x[:, start:], start, store)
    return bool(torch.allclose(full[:, start:], win, atol=1e-4, rtol=1e-4))


def run_checks(model: DiffusionLM, guide: ARGuide, prompts: list[list[int]], opts: Options, mask_id: int,
               eos_id: int) -> dict[str, bool]:
    checks = {"cache_off_equals_reference": True, "freecache_refresh_step_equals_baseline": True,
              "guided_accept_all_equals_drafts": True, "freecache_guided_accept_all_equals_drafts": True,
              "window_forward_equals_full_forward": True}
    g = opts.gen_len
    for pr in prompts:
        base = sample(model, pr, replace(opts, cache="off"), mask_id, eos_id).tokens
        ref = reference_generate(model, pr, g, opts.block, opts.steps_per_block, mask_id)
        checks["cache_off_equals_reference"] &= base == ref
        step = sample(model, pr, replace(opts, cache="refresh_step"), mask_id, eos_id).tokens
        checks["freecache_refresh_step_equals_baseline"] &= step == base
        drafts = all_drafts(model, pr, g, mask_id, eos_id)
        for name, cache in (("guided_accept_all_equals_drafts", "off"),
                            ("freecache_guided_accept_all_equals_drafts", "freecache")):
            got = sample(model, pr, replace(opts, cache=cache, accept="all"), mask_id, eos_id, guide=guide).tokens
            checks[name] &= got == drafts
        checks["window_forward_equals_full_forward"] &= window_matches_full(model, pr, g, mask_id)
    return checks
