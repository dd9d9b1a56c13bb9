"""GPU timing of the sampler on a random-weight diffusion LM of realistic (~1B, LLaDA-like) shape.

Random weights make accuracy meaningless, so this measures only cost: wall-clock per generation and the
DLM's linear work, for each cache mode side by side. The block samplers also run with CUDA graphs
(`--graphs`) and as a batch of prompts (`--batch`); speed-ups compare variants at the same batch and
execution mode. torch + stdlib only (runs on the device box): `python -m services.bench.dlm_timing --json timing.json`.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from services.dlm.guide import ARGuide
from services.dlm.layers import DLMConfig
from services.dlm.model import DiffusionLM
from services.dlm.sampler import CudaGraphs, Options, sample, sample_batch

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


BLOCK_VARIANTS = ("baseline", "freecache", "refresh_block")
GUIDED_VARIANTS = ("guided_accept_all", "freecache_guided_accept_all", "freecache_guided_reject")


def run(shape: str, guide_shape: str, cases: list[tuple[int, int, int]], device: str, repeats: int,
        batches: tuple[int, ...] = (1,), graphs: bool = False, variants: tuple[str, ...] | None = None,
        eager: bool = True) -> dict:
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    if device == "cpu":
        torch.set_num_threads(1)  # the shared 2-core box: a second thread only spins
    torch.manual_seed(0)
    max_len = max(p + g for p, g, _ in cases)
    model = DiffusionLM(DLMConfig(max_len=max_len, **SHAPES[shape])).to(device, dtype).eval()
    guide = ARGuide(DLMConfig(max_len=max_len, **SHAPES[guide_shape])).to(device, dtype).eval()
    vocab = model.cfg.vocab_size
    variants = variants or BLOCK_VARIANTS + GUIDED_VARIANTS
    modes = ([(b, False) for b in batches] if eager else []) + ([(b, True) for b in batches] if graphs else [])
    rows, eager_tokens = [], {}
    for p, g, b in cases:
        gen = torch.Generator().manual_seed(p)
        prompts = [torch.randint(3, vocab, (p,), generator=gen).tolist() for _ in range(max(batches))]
        options = {
            "baseline": Options(gen_len=g, block=b, steps_per_block=b),
            "freecache": Options(gen_len=g, block=b, steps_per_block=b, cache="freecache"),
            "refresh_block": Options(gen_len=g, block=b, steps_per_block=b, cache="refresh_block"),
            # Guided at its best case (every draft accepted) bounds what the guide can buy.
            "guided_accept_all": Options(gen_len=g, block=b, accept="all", guide_chunk=b),
            "freecache_guided_accept_all": Options(gen_len=g, block=b, cache="freecache", accept="all", guide_chunk=b),
            # Random guide + top-k-relative rejects almost everything: one token per step, the worst case.
            "freecache_guided_reject": Options(gen_len=g, block=b, cache="freecache", guide_chunk=b),
        }
        for batch, use_graphs in modes:
            for name in variants:
                guided = name in GUIDED_VARIANTS
                if guided and (batch > 1 or use_graphs):
                    continue  # guided sampling runs one prompt at a time, eagerly
                opts, cg = options[name], CudaGraphs() if use_graphs else None
                prs = prompts[:batch]
                fn = (lambda o=opts, prs=prs: sample(model, prs[0], o, MASK, EOS, guide=guide)) if guided else \
                    (lambda o=opts, cg=cg, prs=prs: sample_batch(model, prs, o, MASK, EOS, graphs=cg)[0])
                sec, res = _time(fn, device, repeats)
                st = res.stats
                key = (p, g, b, name, batch)
                if not use_graphs:
                    eager_tokens[key] = res.tokens
                rows.append({"prompt": p, "gen": g, "block": b, "variant": name, "batch": batch,
                             "graphs": use_graphs, "seconds": sec, "tokens_per_s": batch * g / sec,
                             "forward_passes": st.forward_passes, "dlm_tokens": st.dlm_tokens,
                             "guide_tokens": st.guide_tokens, "formula": formula(p, g, b)})
                if use_graphs and key in eager_tokens:  # graph replay must give the eager tokens
                    rows[-1]["tokens_equal_eager"] = res.tokens == eager_tokens[key]
                print(json.dumps(rows[-1]), flush=True)
    for r in rows:
        base = next((x for x in rows if (x["prompt"], x["gen"], x["batch"], x["graphs"], x["variant"])
                     == (r["prompt"], r["gen"], r["batch"], r["graphs"], "baseline")), None)
        if base is None and r["variant"] in GUIDED_VARIANTS:  # guided rows compare with the eager batch-1 baseline
            base = next((x for x in rows if (x["prompt"], x["gen"], x["batch"], x["graphs"], x["variant"])
                         == (r["prompt"], r["gen"], 1, False, "baseline")), None)
        if base is None:
            continue  # no baseline row to compare with (a --variants subset without it)
        r["speedup"] = base["seconds"] / r["seconds"]
        r["linear_work_reduction"] = base["dlm_tokens"] / r["dlm_tokens"]
    name = torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"
    cudnn = torch.backends.cuda.cudnn_sdp_enabled() if device.startswith("cuda") else None
    return {"device": name, "dtype": str(dtype), "cudnn_sdpa": cudnn, "shape": SHAPES[shape], "guide_shape": SHAPES[guide_shape],
            "params": model.num_params(), "guide_params": guide.num_params(), "rows": rows}


def _profile(shape: str, case: tuple[int, int, int], device: str, out: Path) -> None:
    """Kernel-time table of one eager FreeCache generation: where a batch-1 step's time goes."""
    from torch.profiler import ProfilerActivity, profile

    p, g, b = case
    model = DiffusionLM(DLMConfig(max_len=p + g, **SHAPES[shape])).to(device, torch.bfloat16).eval()
    prompt = torch.randint(3, model.cfg.vocab_size, (p,), generator=torch.Generator().manual_seed(p)).tolist()
    opts = Options(gen_len=g, block=b, steps_per_block=b, cache="freecache")
    sample(model, prompt, opts, MASK, EOS)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        sample(model, prompt, opts, MASK, EOS)
        torch.cuda.synchronize()
    out.write_text(prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=60))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--shape", default="1b", choices=sorted(SHAPES))
    ap.add_argument("--guide-shape", default="guide135m", choices=sorted(SHAPES))
    ap.add_argument("--cases", default="256x256x32,1024x256x32", help="PxGxB,...")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", default="1", help="comma-separated batch sizes for the block samplers, e.g. 1,16")
    ap.add_argument("--graphs", action="store_true", help="also time the block samplers from CUDA graphs")
    ap.add_argument("--graphs-only", action="store_true", help="with --graphs: skip the eager block-sampler rows")
    ap.add_argument("--cudnn-sdpa", choices=("on", "off"), default="on",
                    help="PyTorch's cuDNN attention backend (the engine turns it off on CUDA)")
    ap.add_argument("--profile", type=Path, default=None,
                    help="write the top CUDA kernels of one eager batch-1 FreeCache generation (first case) here")
    ap.add_argument("--variants", default=None, help="comma-separated subset of " + ",".join(BLOCK_VARIANTS + GUIDED_VARIANTS))
    ap.add_argument("--json", dest="out", type=Path, help="write the timings here (required)")
    ap.add_argument("--out", dest="out", type=Path, help=argparse.SUPPRESS)  # the old spelling of --json
    a = ap.parse_args()
    if a.out is None:
        ap.error("--json is required")
    cases = [tuple(int(v) for v in c.split("x")) for c in a.cases.split(",")]
    if a.device.startswith("cuda"):
        torch.backends.cuda.enable_cudnn_sdp(a.cudnn_sdpa == "on")
    batches = tuple(int(v) for v in a.batch.split(","))
    if a.profile:
        _profile(a.shape, cases[0], a.device, a.profile)
    variants = tuple(a.variants.split(",")) if a.variants else None
    if a.graphs and not a.device.startswith("cuda"):
        ap.error("--graphs needs --device cuda")
    a.out.write_text(json.dumps(run(a.shape, a.guide_shape, cases, a.device, a.repeats, batches, a.graphs,
                                    variants, eager=not a.graphs_only), indent=1))


if __name__ == "__main__":
    main()
