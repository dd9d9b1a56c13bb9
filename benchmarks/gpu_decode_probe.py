"""Where the graphed decode step spends its time (GPU diagnosis): attention kernel variants, per-kernel breakdown.

    PYTHONPATH=. python benchmarks/gpu_decode_probe.py --json probe.json
"""

from __future__ import annotations

import argparse
import json

import torch

from services.engine import kernels
from services.engine.fused import decode_step, triton_ops
from services.engine.graphs import attn_splits
from services.engine.roofline import _events_ms, cuda_random_engine


def attn_sweep(batches: tuple[int, ...], context: int) -> list[dict]:
    """decode_attention alone at Llama-1B layer shapes: GB/s of live K+V read, per variant."""
    H, Hkv, D = 32, 8, 64
    rows = []
    for b in batches:
        k = torch.randn(b, context + 64, Hkv, D, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
        q = torch.randn(b, H, D, device="cuda", dtype=torch.bfloat16)
        pos = torch.full((b,), context - 1, device="cuda", dtype=torch.int64)
        live = 2 * b * context * Hkv * D * 2
        base = attn_splits(b, Hkv, 132)
        for splits in sorted({1, base, max(1, base // 2), min(16, base * 2)}):
            for block_n, warps, stages in ((32, 4, 2), (64, 4, 2), (64, 4, 3), (128, 4, 2), (128, 8, 2)):
                args = (q, k, v, pos, splits, block_n, warps, stages)
                ms = _events_ms(lambda args=args: kernels.decode_attention(*args), 20)
                rows.append({"batch": b, "splits": splits, "block_n": block_n, "warps": warps, "stages": stages,
                             "us": ms * 1e3, "GBps": live / (ms * 1e-3) / 1e9})
        best = min((r for r in rows if r["batch"] == b), key=lambda r: r["us"])
        print(f"attention B={b}: best {best}", flush=True)
    return rows


def breakdown(shape: str, batch: int, context: int) -> str:
    """Per-kernel device time of the fused step run eagerly (the graph replays the same kernels)."""
    engine = cuda_random_engine(shape)
    fm, ops = engine.graphs.fused, triton_ops()
    kv = engine.new_kv(batch, context + 8)
    kv.k.normal_()
    kv.v.normal_()
    tok = torch.randint(0, engine.cfg.vocab_size, (batch,), device="cuda")
    pos = torch.full((batch,), context, device="cuda", dtype=torch.int64)
    slot = torch.arange(batch, device="cuda")
    splits = attn_splits(batch, fm.n_kv, 132)
    with torch.inference_mode():
        for _ in range(3):
            decode_step(fm, ops, tok, pos, slot, kv.k, kv.v, splits)
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                decode_step(fm, ops, tok, pos, slot, kv.k, kv.v, splits)
            torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=14)
    print(f"--- {shape} B={batch} ctx {context}: 5 steps, eager launch of the fused step\n{table}", flush=True)
    return table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--json")
    a = ap.parse_args()
    out = {"attention": attn_sweep((1, 8, 32, 64), a.context),
           "breakdown": {f"llama-3.2-1b B={b}": breakdown("llama-3.2-1b", b, a.context) for b in (1, 64)}}
    out["breakdown"]["smollm2-135m B=1"] = breakdown("smollm2-135m", 1, 256)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
