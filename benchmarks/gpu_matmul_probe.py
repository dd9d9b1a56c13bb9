"""Decode-shaped projections (few rows x a weight matrix) through cuBLAS in several formulations (GPU diagnosis).

    PYTHONPATH=. python benchmarks/gpu_matmul_probe.py --json matmul.json

Each variant runs 20 times inside one CUDA graph; the table gives microseconds per call and weight bytes / time.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

SHAPES = {  # name: (N, K) of y = x @ W.T
    "1b.qkv": (3072, 2048), "1b.o": (2048, 2048), "1b.gate_up": (16384, 2048), "1b.down": (2048, 8192),
    "1b.head": (128256, 2048), "135m.qkv": (960, 576), "135m.o": (576, 576), "135m.gate_up": (3072, 576),
    "135m.down": (576, 1536), "135m.head": (49152, 576),
}


def variants(x: torch.Tensor, w: torch.Tensor) -> dict:
    m, k = x.shape
    n = w.shape[0]
    out = {"linear": lambda: F.linear(x, w), "mm_wt": lambda: torch.mm(w, x.t())}
    for s in (2, 4, 8):
        if k % s == 0:
            xs = x.view(m, s, k // s).transpose(0, 1)
            ws = w.view(n, s, k // s).permute(1, 2, 0)
            out[f"splitk{s}"] = lambda xs=xs, ws=ws: torch.bmm(xs, ws).sum(0)
            try:
                torch.bmm(xs, ws, out_dtype=torch.float32)
                out[f"splitk{s}_f32"] = lambda xs=xs, ws=ws: torch.bmm(xs, ws, out_dtype=torch.float32).sum(0)
            except (TypeError, RuntimeError):
                pass
    return out


def graph_us(fn, n: int = 20) -> float:
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(n):
            fn()
    g.replay()
    times = []
    for _ in range(5):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / n)
    return sorted(times)[2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--json")
    a = ap.parse_args()
    rows = []
    for name, (n, k) in SHAPES.items():
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        for m in (1, 8, 64):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            res = {v: graph_us(fn) for v, fn in variants(x, w).items()}
            best = min(res, key=res.get)
            rows.append({"shape": name, "m": m, "n": n, "k": k, "us": res, "best": best})
            print(f"{name:14} M={m:<3} linear {res['linear']:7.1f} us ({2 * n * k / res['linear'] / 1e6:5.2f} TB/s)"
                  f" | best {best} {res[best]:7.1f} us ({2 * n * k / res[best] / 1e6:5.2f} TB/s)", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
