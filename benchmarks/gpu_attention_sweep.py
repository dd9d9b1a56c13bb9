"""Attention tilings of the decode step side by side (GPU diagnosis): rope_attention and its split reduce per
layer, over key splits, keys per tile, warps, pipeline stages and grid order, each in one CUDA graph over 16
layers' caches (more than the L2 holds), Llama-3.2-1B heads (32 query / 8 KV, 64 wide), every row at `context`
tokens. Prints the fastest tilings per batch beside attn_splits' and attn_tiles' choices.

    PYTHONPATH=. python benchmarks/gpu_attention_sweep.py --batches 1,8,16,32,64 --context 1024 --json sweep.json
"""

from __future__ import annotations

import argparse
import itertools
import json

import torch

from services.engine import kernels
from services.engine.graphs import attn_splits, attn_tiles, replay_us

H, HKV, D, LAYERS = 32, 8, 64, 16


def sweep(batch: int, context: int, configs: list[tuple], rounds: int) -> dict:
    dev, cap = "cuda", context + 8
    k = [torch.randn(batch, cap, HKV, D, device=dev, dtype=torch.bfloat16) for _ in range(LAYERS)]
    v = [torch.randn_like(t) for t in k]
    qkv = torch.randn(4, batch, (H + 2 * HKV) * D, device=dev)  # split-K partials, as the step passes them
    pos = torch.full((batch,), context - 1, device=dev, dtype=torch.int64)
    slot = torch.arange(batch, device=dev)
    cos, sin = torch.randn(cap, D // 2, device=dev), torch.randn(cap, D // 2, device=dev)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    ref = kernels.rope_attention(qkv, pos, slot, cos, sin, k[0], v[0], H, HKV, attn_splits(batch, HKV, sms))
    graphs, errors = {}, {}
    for cfg in configs:
        splits, block, warps, stages, hk_fast = cfg
        if context // splits < block:
            continue

        def step(splits: int = splits, block: int = block, warps: int = warps, stages: int = stages,
                 hk_fast: bool = hk_fast) -> torch.Tensor:
            outs = [kernels.rope_attention(qkv, pos, slot, cos, sin, k[i], v[i], H, HKV, splits, block_n=block,
                                           num_warps=warps, num_stages=stages, hk_fast=hk_fast)
                    for i in range(LAYERS)]
            return outs[0]
        errors[cfg] = (step().float() - ref.float()).abs().max().item()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        graphs[cfg] = graph
    times: dict[tuple, list[float]] = {cfg: [] for cfg in graphs}
    for _ in range(rounds):  # in turns, so drift hits every tiling alike
        for cfg, graph in graphs.items():
            times[cfg].append(replay_us(graph, 2) / LAYERS)
    us = {cfg: sorted(t)[len(t) // 2] for cfg, t in times.items()}
    ideal = 2 * batch * context * HKV * D * 2 / 4.25e6  # live K and V bytes at 4.25 TB/s, in us
    tiles = attn_tiles(batch, HKV, sms)
    tuned = (tiles["splits"], tiles["block_n"], 4, tiles["num_stages"], tiles["hk_fast"])
    legacy = (attn_splits(batch, HKV, sms), 64, 4, 2, False)
    print(f"B={batch} context {context}: copy-bandwidth ideal {ideal:.2f} us; attn_tiles {tuned}: "
          f"{us.get(tuned, float('nan')):.2f} us; before attn_tiles {legacy}: {us.get(legacy, float('nan')):.2f} us")
    for cfg in sorted(us, key=us.get)[:6]:
        print(f"  splits {cfg[0]:2d} block {cfg[1]:3d} warps {cfg[2]} stages {cfg[3]} hk_fast {cfg[4]!s:5}: "
              f"{us[cfg]:6.2f} us  max |diff| {errors[cfg]:.3g}")
    return {"batch": batch, "context": context, "attn_tiles": list(tuned), "legacy": list(legacy),
            "us": {"/".join(str(x) for x in cfg): round(t, 2) for cfg, t in sorted(us.items(), key=lambda kv: kv[1])}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="1,8,16,32,64")
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--json")
    a = ap.parse_args()
    configs = list(itertools.product([1, 2, 4, 8, 16], [64, 128], [4, 8], [2, 3, 4], [True, False]))
    out = [sweep(int(b), a.context, configs, a.rounds) for b in a.batches.split(",")]
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
