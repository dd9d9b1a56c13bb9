"""Time one batched decode step of the engine per dtype, and list the slowest ops (GPU diagnosis).

    PYTHONPATH=. python benchmarks/gpu_step_probe.py --device cuda --batch 8 --context 256
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from services.engine import ModelConfig, random_engine

LLAMA_1B = dict(vocab_size=128256, dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, hidden_dim=8192,
                rope_theta=500000.0, max_seq_len=4096,
                rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                              "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})


def step_ms(engine, batch: int, context: int, iters: int) -> float:
    kv = engine.new_kv(batch, context + iters + 8)
    engine.prefill([[1] * context for _ in range(batch)], kv, list(range(batch)))
    sync = torch.cuda.synchronize if engine.device.type == "cuda" else (lambda: None)
    for _ in range(3):
        engine.decode([2] * batch, kv, slice(0, batch))
    sync()
    t0 = time.perf_counter()
    for _ in range(iters):
        engine.decode([2] * batch, kv, slice(0, batch))
    sync()
    return (time.perf_counter() - t0) / iters * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--json")
    ap.add_argument("--sweep", action="store_true", help="bf16 only: step time at batch 1 and 8, cuDNN SDPA on vs off")
    a = ap.parse_args()
    if a.sweep:
        engine = random_engine(ModelConfig(**LLAMA_1B), device=a.device, dtype=torch.bfloat16)
        rows = {}
        for batch in (1, 8):
            for cudnn in (True, False):
                torch.backends.cuda.enable_cudnn_sdp(cudnn)
                rows[f"batch{batch}_cudnn_{'on' if cudnn else 'off'}"] = ms = step_ms(engine, batch, a.context, a.iters)
                print(f"bf16 batch {batch} cuDNN SDPA {'on ' if cudnn else 'off'}: {ms:.2f} ms/step", flush=True)
        if a.json:
            with open(a.json, "w") as f:
                json.dump(rows, f, indent=1)
        return
    out = {}
    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        engine = random_engine(ModelConfig(**LLAMA_1B), device=a.device, dtype=dtype)
        out[name] = {"step_ms": step_ms(engine, a.batch, a.context, a.iters)}
        kv = engine.new_kv(a.batch, a.context + 16)
        engine.prefill([[1] * a.context for _ in range(a.batch)], kv, list(range(a.batch)))
        acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if a.device == "cuda" else [])
        with torch.profiler.profile(activities=acts) as prof:
            for _ in range(3):
                engine.decode([2] * a.batch, kv, slice(0, a.batch))
            if a.device == "cuda":
                torch.cuda.synchronize()
        key = "self_cuda_time_total" if a.device == "cuda" else "self_cpu_time_total"
        table = prof.key_averages().table(sort_by=key, row_limit=12)
        out[name]["top_ops"] = table
        print(name, f"{out[name]['step_ms']:.2f} ms/step", flush=True)
        print(table, flush=True)
        del engine, kv
        if a.device == "cuda":
            torch.cuda.empty_cache()
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
