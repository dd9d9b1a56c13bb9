"""The prompt phase outside the fused loop, and the solo run every fused request is checked against."""

from __future__ import annotations

import torch

from services.batching.request import reserved_tokens
from services.engine import Engine
from services.engine.sampling import Sampler, SamplingParams


def prefill(engine: Engine, prompt: list[int], params: SamplingParams) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], int]:
    """Run one prompt alone: (per-layer K/V of the prompt, the first token sampled with the request's sampler)."""
    kv = engine.new_kv(1, len(prompt))
    logits = engine.prefill([prompt], kv, [0])
    first = Sampler(params).sample(logits[0])
    return kv.export(0), first


def solo_decode(engine: Engine, prompt_kv: list[tuple[torch.Tensor, torch.Tensor]], first_token: int,
                params: SamplingParams) -> list[int]:
    """The request run alone, one token per step: the tokens after first_token, ending like the scheduler does."""
    cfg = engine.cfg
    n = prompt_kv[0][0].shape[0]
    cap = reserved_tokens(n, params.max_tokens, cfg.max_seq_len)
    kv = engine.new_kv(1, cap)
    kv.import_all(0, prompt_kv)
    sampler = Sampler(params)
    out: list[int] = []
    tok, generated = first_token, 1
    while True:
        if (not params.ignore_eos and tok in cfg.eos_ids) or generated >= params.max_tokens or n + generated - 1 >= cap:
            return out
        tok = sampler.sample(engine.decode([tok], kv, slice(0, 1))[0])
        generated += 1
        out.append(tok)
