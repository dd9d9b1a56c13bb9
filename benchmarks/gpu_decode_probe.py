"""Where the decode step spends its time (GPU diagnosis): per-kernel device time of the fused step.

    PYTHONPATH=. python benchmarks/gpu_decode_probe.py --json probe.json
"""

from __future__ import annotations

import argparse
import json
from functools import partial

import torch

from services.bench.fusion import SHAPES, random_on_device
from services.engine.fused import decode_step
from services.engine.graphs import DecodeGraphs, attn_tiles, bucket_for


def breakdown(shape: str, batch: int, context: int, gemv: str = "auto") -> str:
    """Per-kernel device time of the fused step run eagerly (the graph replays the same kernels), with the
    projections' kernels the bucket's plan picks (`gemv`: auto, on or off, as in services.engine.gemv)."""
    engine = random_on_device(SHAPES[shape], "cuda", torch.bfloat16, shape)
    engine.graphs = DecodeGraphs(engine.model, gemv)
    fm = engine.graphs.fused
    kv = engine.new_kv(batch, context + 8)
    kv.k.normal_()
    kv.v.normal_()
    with torch.inference_mode():
        ops = engine.graphs.ops_for(bucket_for(batch), kv)
    plan = engine.graphs.plans[bucket_for(batch)].summary()
    tok = torch.randint(0, engine.cfg.vocab_size, (batch,), device="cuda")
    pos = torch.full((batch,), context, device="cuda", dtype=torch.int64)
    slot = torch.arange(batch, device="cuda")
    tiles = attn_tiles(bucket_for(batch), fm.n_kv, engine.graphs.sms)
    splits = tiles.pop("splits")
    ops.rope_attention = partial(ops.rope_attention, **tiles)
    with torch.inference_mode():
        for _ in range(3):
            decode_step(fm, ops, tok, pos, slot, kv.k, kv.v, splits)
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                decode_step(fm, ops, tok, pos, slot, kv.k, kv.v, splits)
            torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=14)
    head = f"--- {shape} B={batch} ctx {context} gemv {gemv}: 5 steps, eager launch of the fused step"
    print(f"{head}\nprojections: {plan['choices']}\ntimed candidates (us per layer): {plan['timings_us']}\n"
          f"rejected: {plan['rejected']}\n{table}", flush=True)
    return f"projections: {plan['choices']}\n{plan['timings_us']}\n{table}"


def baseline_breakdown(batch: int, context: int) -> str:
    """The same for the plain PyTorch step that `tandem bench engine --roofline` graphs as its baseline."""
    from services.bench.roofline import plain_graph_step

    engine = random_on_device(SHAPES["llama-3.2-1b"], "cuda", torch.bfloat16, "llama-3.2-1b")
    _, set_pos, step = plain_graph_step(engine, batch, context + 64)
    with torch.inference_mode():
        set_pos(context)
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                step()
            torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=14)
    print(f"--- plain baseline llama-3.2-1b B={batch} ctx {context}: 5 steps, eager launch\n{table}", flush=True)
    return table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--batches", default="1,64", help="Llama-3.2-1B batches, each with gemv auto and off")
    ap.add_argument("--json")
    a = ap.parse_args()
    cases = [("llama-3.2-1b", int(b), a.context, g) for b in a.batches.split(",") for g in ("auto", "off")]
    cases.append(("smollm2-135m", 1, 256, "auto"))
    out = {f"{shape} B={b} gemv {g}": breakdown(shape, b, ctx, g) for shape, b, ctx, g in cases}
    out["plain baseline llama-3.2-1b B=1"] = baseline_breakdown(1, a.context)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
