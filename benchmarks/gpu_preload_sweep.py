"""Whole decode steps with the attention kernel's KV preload (fused.PDL_PRE) against the kept late trigger
(fused.PDL_LATE), side by side in one run, per batch and attention tiling; Llama-3.2-1B shapes, bf16, random
weights and KV, CUDA graphs as the engine replays them.

    PYTHONPATH=. python benchmarks/gpu_preload_sweep.py --batches 1,8,16,32,64 --context 1024 --json F

Each variant is a DecodeGraphs of its own over the same KV buffer; the variants are timed in turns, `rounds`
times, and the median of each is reported (ms per step) with its ratio to the late trigger.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from services.bench.roofline import _events_ms, random_on_device
from services.engine import graphs as graphs_mod
from services.engine.fused import PDL_LATE, PDL_PRE
from services.engine.graphs import DecodeGraphs, attn_tiles, bucket_for
from services.engine.shapes import SHAPES


def variants(rows: int, n_kv: int, sms: int) -> list[tuple[str, int, dict | None]]:
    """(name, pdl, tiles or None for attn_tiles' own) to time at this bucket."""
    tuned = attn_tiles(rows, n_kv, sms)
    out: dict[str, tuple[int, dict | None]] = {"late": (PDL_LATE, None)}
    for pre in (0, 1, 2):  # pre0: only the q/k/v projection's early trigger
        out[f"pre{pre}"] = (PDL_PRE, {**tuned, "pre": pre})
    for mult in (2, 4):
        splits = min(16, tuned["splits"] * mult)
        out[f"pre2 splits{splits} b64"] = (PDL_PRE, {"splits": splits, "block_n": 64, "num_stages": 2,
                                                      "hk_fast": True, "pre": 2})
    if tuned["block_n"] == 128:
        out["pre1 b64 s3"] = (PDL_PRE, {**tuned, "block_n": 64, "pre": 1})
    return [(name, pdl, tiles) for name, (pdl, tiles) in out.items()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batches", default="1,8,16,32,64")
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json")
    a = ap.parse_args()
    engine = random_on_device(SHAPES["llama-3.2-1b"], "cuda", torch.bfloat16, "llama-3.2-1b")
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    real_tiles = graphs_mod.attn_tiles
    rows_out = []
    for batch in (int(b) for b in a.batches.split(",")):
        b = bucket_for(batch)
        kv = engine.new_kv(batch, a.context + a.steps + 1)
        kv.k.normal_()
        kv.v.normal_()
        tokens = torch.randint(0, engine.cfg.vocab_size, (batch,)).tolist()

        def run() -> None:
            kv.lengths[:] = [a.context] * batch
            for _ in range(a.steps):
                engine.decode(tokens, kv, slice(0, batch))

        made = []
        for name, pdl, tiles in variants(b, engine.cfg.n_kv_heads, sms):
            graphs_mod.attn_tiles = real_tiles if tiles is None else (lambda *args, t=tiles, **kw: dict(t))
            try:
                g = DecodeGraphs(engine.model, "auto", pdl)
                engine.graphs = g
                run()  # captures
            finally:
                graphs_mod.attn_tiles = real_tiles
            made.append((name, g, tiles))
        times: dict[str, list[float]] = {name: [] for name, _, _ in made}
        for _ in range(a.rounds):
            for name, g, _ in made:
                engine.graphs = g
                times[name].append(_events_ms(run, 1) / a.steps)
        med = {n: statistics.median(t) for n, t in times.items()}
        row = {"batch": batch, "context": a.context, "step_ms": med,
               "ratio_to_late": {n: med[n] / med["late"] for n in med},
               "tiles": {n: (t or real_tiles(b, engine.cfg.n_kv_heads, sms)) for n, _, t in made},
               "replay_us": {n: g.step_choice[b].get("replay_us") for n, g, _ in made}}
        rows_out.append(row)
        print(f"B={batch}: " + "  ".join(f"{n} {med[n]:.4f} ms ({med[n] / med['late']:.3f})" for n in med), flush=True)
        del made
        engine.graphs = None
        kv.lengths[:] = [0] * batch
        kv.resize(1, 1)
        torch.cuda.empty_cache()
    if a.json:
        Path(a.json).write_text(json.dumps({"device": torch.cuda.get_device_name(0), "rows": rows_out}, indent=1))


if __name__ == "__main__":
    main()
