"""Train the small DLM on SmolLM2's tokenizer (CPU is enough): LLaDA's masked objective on the text tasks,
over the compact id table of the bridge. `tandem dlm train --smollm2 --seconds 420 --threads 2`."""

from __future__ import annotations

import math
import random
import time
from pathlib import Path

import torch

from services.dlm.layers import DLMConfig
from services.dlm.model import DiffusionLM
from services.dlm.smol import SmolBridge, save, smol_tokenizer
from services.dlm.smol_tasks import GEN_LEN, PROMPT_LEN, make_example
from services.train.dlm import dlm_loss

SIZE = dict(dim=128, n_layers=4, n_heads=4, ffn_dim=384)


def make_data(bridge: SmolBridge, tok, n: int, seed: int = 0) -> torch.Tensor:
    """n training examples as compact ids (seed < 10_000; the eval set uses 12345)."""
    rng = random.Random(seed)
    lut = {t: i for i, t in enumerate(bridge.ids)}
    rows = [[lut[t] for t in bridge.encode_example(tok, make_example(rng))] for _ in range(n)]
    return torch.tensor(rows, dtype=torch.long)


def train(seconds: float, out: Path, batch_size: int, lr: float, examples: int) -> Path:
    torch.manual_seed(0)
    tok = smol_tokenizer()
    bridge = SmolBridge.build(tok)
    data = make_data(bridge, tok, examples)
    cfg = DLMConfig(vocab_size=bridge.compact_size, max_len=PROMPT_LEN + GEN_LEN, **SIZE)
    model = DiffusionLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
    mask = bridge.compact_size - 1
    t0, step, ema = time.time(), 0, None
    while (elapsed := time.time() - t0) < seconds:
        frac = elapsed / seconds  # cosine on wall-clock progress: the time budget sets the run length
        for gr in opt.param_groups:
            gr["lr"] = lr * min(1.0, (step + 1) / 200) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * frac)))
        loss = dlm_loss(model, data[torch.randint(0, len(data), (batch_size,))], mask, PROMPT_LEN)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        if step % 200 == 0:
            print(f"step {step} t={elapsed:.0f}s loss~{ema:.4f}", flush=True)
    digest = save(model.eval(), bridge, out, meta={"steps": step, "seconds": seconds, "batch": batch_size,
                                                   "final_loss": ema, "examples": len(data),
                                                   "threads": torch.get_num_threads()})
    print(f"{step} steps, loss~{ema:.4f}, {model.num_params()} params, table {len(bridge.ids)} ids -> {out} "
          f"sha256 {digest}", flush=True)
    return out

