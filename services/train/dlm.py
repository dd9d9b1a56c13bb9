"""Train the diffusion LM (LLaDA masked objective) or the AR guide on the task corpus; torch + stdlib only,
so it runs unchanged on the GPU box: `tandem dlm train --model dlm --seconds 180 --out DIR`."""

from __future__ import annotations

import math
import random
import time
from multiprocessing import Pool
from pathlib import Path

import torch
import torch.nn.functional as F

from services.dlm.checkpoint import save
from services.dlm.layers import DLMConfig
from services.dlm.tasks import GEN_LEN, PROMPT_LEN, batch, encode_example, make_example
from services.dlm.tokenizer import CharTokenizer

SIZES = {
    "dlm": dict(dim=192, n_layers=6, n_heads=6, ffn_dim=512),
    "guide": dict(dim=128, n_layers=4, n_heads=4, ffn_dim=384),
    "weak": dict(dim=96, n_layers=4, n_heads=4, ffn_dim=256),
    "tiny": dict(dim=32, n_layers=2, n_heads=2, ffn_dim=64),
}


def _chunk(seed: int, task: str | None = None) -> torch.Tensor:
    rng, tok = random.Random(seed), CharTokenizer()
    if task is None:
        return torch.tensor(batch(tok, rng, 20_000), dtype=torch.uint8)
    return torch.tensor([encode_example(tok, make_example(rng, task)) for _ in range(20_000)], dtype=torch.uint8)


def make_pool(n_chunks: int, workers: int, sort_chunks: int = 0) -> torch.Tensor:
    """Training examples from seeds 0..n_chunks-1 (evaluation uses a different seed, see tasks.eval_set),
    plus `sort_chunks` chunks of sorting only (seeds 5000+, for a sorting-heavy fine-tune)."""
    with Pool(workers) as pool:
        mixed = pool.map(_chunk, range(n_chunks))
        sort = pool.starmap(_chunk, [(5000 + i, "sort") for i in range(sort_chunks)])
    return torch.cat(mixed + sort)


def dlm_loss(model: torch.nn.Module, x0: torch.Tensor, mask_id: int, p: int) -> torch.Tensor:
    """LLaDA: mask each response token with probability t ~ U(eps, 1); CE on masked tokens weighted 1/t."""
    b, n = x0.shape
    t = torch.rand(b, 1, device=x0.device) * (1 - 1e-3) + 1e-3
    masked = torch.rand(b, n, device=x0.device) < t
    masked[:, :p] = False  # the prompt is never masked
    xt = torch.where(masked, torch.full_like(x0, mask_id), x0)
    logits = model(xt)
    ce = F.cross_entropy(logits.transpose(1, 2), x0, reduction="none")
    return (ce * masked / t).sum() / (b * (n - p))


def guide_loss(model: torch.nn.Module, x0: torch.Tensor, p: int) -> torch.Tensor:
    """Next-token CE on the response only (prompts are random digits, nothing to learn there)."""
    logits = model(x0[:, :-1])
    return F.cross_entropy(logits[:, p - 1:].transpose(1, 2), x0[:, p:])


def train(kind: str, size: str, seconds: float, out: Path, batch_size: int, lr: float, chunks: int,
          workers: int, device: str, init: Path | None = None, sort_chunks: int = 0, warmup: int = 300,
          name: str | None = None) -> Path:
    from services.dlm.guide import ARGuide
    from services.dlm.model import DiffusionLM

    torch.manual_seed(0)
    tok = CharTokenizer()
    cfg = DLMConfig(vocab_size=tok.vocab_size, max_len=PROMPT_LEN + GEN_LEN, **SIZES[size])
    data = make_pool(chunks, workers, sort_chunks).to(device).long()  # fork the workers before CUDA starts
    model = (DiffusionLM if kind == "dlm" else ARGuide)(cfg).to(device)
    if init is not None:  # continue from a shipped checkpoint (a fine-tune), sha256-checked by load()
        from services.dlm.checkpoint import load

        model.load_state_dict(load(init)[0].state_dict())
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
    amp = device.startswith("cuda")
    t0, step, ema = time.time(), 0, None
    est_steps = None
    log_every = 1000 if amp else 50
    while (elapsed := time.time() - t0) < seconds:
        # Cosine schedule on wall-clock progress, so a time budget (not a step count) sets the run length.
        frac = elapsed / seconds
        for gr in opt.param_groups:
            gr["lr"] = lr * min(1.0, (step + 1) / warmup) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * frac)))
        x0 = data[torch.randint(0, len(data), (batch_size,), device=device)]
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            loss = dlm_loss(model, x0, tok.mask_id, PROMPT_LEN) if kind == "dlm" else \
                guide_loss(model, x0, PROMPT_LEN)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        if step % 50 == 0:
            ema = loss.item() if ema is None else 0.9 * ema + 0.1 * loss.item()
        if step % log_every == 0:
            print(f"{kind} step {step} t={elapsed:.0f}s loss~{ema:.4f}", flush=True)
    est_steps = step
    path = out / (name or f"{kind}{'' if size == kind else '_' + size}.pt")
    save(model.cpu().eval(), tok, path, meta={"steps": est_steps, "seconds": seconds, "batch": batch_size,
                                              "final_loss": ema, "examples": len(data), "lr": lr,
                                              "init": init.name if init else None, "sort_chunks": sort_chunks})
    print(f"{kind}: {est_steps} steps, loss~{ema}, {model.num_params()} params -> {path}", flush=True)
    return path

