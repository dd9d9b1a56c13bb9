"""GPU timing of the sampler on a random-weight diffusion LM of realistic (~1B, LLaDA-like) shape.

Random weights make accuracy meaningless, so this measures only cost: wall-clock per generation and the
DLM's linear work, for each cache mode side by side. torch + stdlib only (runs on the device box):
`python -m services.dlm.timing --out timing.json`.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from services.dlm.guide import ARGuide
from services.dlm.layers import Config
from services.dlm.model import DiffusionLM
from services.dlm.sampler import Options, sample

SHAPES = {
    "1b": dict(vocab_size=32000, dim=2048, n_layers=16, n_heads=16, ffn_dim=5632),
    "guide135m": dict(vocab_size=32000, dim=576, n_layers=30, n_heads=9, ffn_dim=1536),
    "cpu_mid": dict(vocab_size=4096, dim=256, n_layers=6, n_heads=4, ffn_dim=704),
    "cpu_guide": dict(vocab_size=4096, dim=128, n_layers=4, n_heads=4, ffn_dim=384),
    "tiny": dict(vocab_size=64, dim=64, n_layers=2, n_heads=2, ffn_dim=128),
    "tinyguide": dict(vocab_size=64, dim=32, n_layers=2, n_heads=2, ffn_dim=64),
}
MASK, EOS = 1, 2


def formula(p: int, g: int, b: int) -> float:
    n = g // b
    return 2 * (p + g) * n / (g * (n + 1))


def _time(fn, device: str, repeats: int) -> tuple[float, object]:
    fn()  # warm-up (allocator, kernels)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeats):
        out = fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / repeats, out


def run(shape: str, guide_shape: str, cases: list[tuple[int, int, int]], device: str, repeats: int) -> dict:
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    if device == "cpu":
        torch.set_num_threads(1)  # the shared 2-core box: a second thread only spins
    torch.manual_seed(0)
    max_len = max(p + g for p, g, _ in cases)
    model = DiffusionLM(Config(max_len=max_len, **SHAPES[shape])).to(device, dtype).eval()
    guide = ARGuide(Config(max_len=max_len, **SHAPES[guide_shape])).to(device, dtype).eval()
    vocab = model.cfg.vocab_size
    rows = []
    for p, g, b in cases:
        prompt = torch.randint(3, vocab, (p,), generator=torch.Generator().manual_seed(p)).tolist()
        variants = {
            "baseline": (Options(gen_len=g, block=b, steps_per_block=b), None),
            "freecache": (Options(gen_len=g, block=b, steps_per_block=b, cache="freecache"), None),
            "refresh_block": (Options(gen_len=g, block=b, steps_per_block=b, cache="refresh_block"), None),
            # Guided at its best case (every draft accepted) bounds what the guide can buy.
            "guided_accept_all": (Options(gen_len=g, block=b, accept="all", guide_chunk=b), guide),
            "freecache_guided_accept_all": (Options(gen_len=g, block=b, cache="freecache", accept="all",
                                                    guide_chunk=b), guide),
            # Random guide + top-k-relative rejects almost everything: one token per step, the worst case.
            "freecache_guided_reject": (Options(gen_len=g, block=b, cache="freecache", guide_chunk=b), guide),
        }
        base_s = None
        for name, (opts, gd) in variants.items():
            sec, res = _time(lambda o=opts, gd=gd, pr=prompt: sample(model, pr, o, MASK, EOS, guide=gd), device, repeats)
            base_s = base_s or sec
            st = res.stats
            rows.append({"prompt": p, "gen": g, "block": b, "variant": name, "seconds": sec,
                         "speedup": base_s / sec, "forward_passes": st.forward_passes,
                         "dlm_tokens": st.dlm_tokens, "guide_tokens": st.guide_tokens,
                         "formula": formula(p, g, b)})
            print(json.dumps(rows[-1]), flush=True)
    for r in rows:
        base = next(x for x in rows if (x["prompt"], x["gen"], x["variant"]) == (r["prompt"], r["gen"], "baseline"))
        r["linear_work_reduction"] = base["dlm_tokens"] / r["dlm_tokens"]
    name = torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"
    return {"device": name, "dtype": str(dtype), "shape": SHAPES[shape], "guide_shape": SHAPES[guide_shape],
            "params": model.num_params(), "guide_params": guide.num_params(), "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--shape", default="1b", choices=sorted(SHAPES))
    ap.add_argument("--guide-shape", default="guide135m", choices=sorted(SHAPES))
    ap.add_argument("--cases", default="256x256x32,1024x256x32", help="PxGxB,...")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    cases = [tuple(int(v) for v in c.split("x")) for c in a.cases.split(",")]
    a.out.write_text(json.dumps(run(a.shape, a.guide_shape, cases, a.device, a.repeats), indent=1))


if __name__ == "__main__":
    main()
