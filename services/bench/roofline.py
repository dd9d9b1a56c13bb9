"""`tandem bench engine --roofline`: the engine's decode step beside a plain graphed PyTorch step of the same
shapes and the HBM roofline, and prefill against the measured bf16 matmul peak. CUDA only.

Roofline of a decode step = (weight bytes + live KV bytes read) / measured device copy bandwidth.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from services.bench.fusion import SHAPES, random_on_device
from services.engine.config import ModelConfig
from services.engine.engine import Engine
from services.engine.graphs import bucket_for
from services.engine.layers import apply_rope, rope_cos_sin

PREFILL_TOKENS = (512, 2048, 8192)


def _events_ms(fn: Callable[[], None], reps: int) -> float:
    """Median device time of fn() over reps, by CUDA events (one warm-up first)."""
    fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def copy_bandwidth(nbytes: int = 2 << 30) -> float:
    """Device-to-device copy, bytes read + bytes written per second."""
    x = torch.randn(nbytes // 2, device="cuda", dtype=torch.bfloat16)
    y = torch.empty_like(x)
    ms = _events_ms(lambda: y.copy_(x), 10)
    return 2 * nbytes / (ms * 1e-3)


def matmul_peak(n: int = 8192) -> float:
    """bf16 FLOP/s of an n x n x n product on random data."""
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    ms = _events_ms(lambda: torch.mm(a, b), 10)
    return 2 * n ** 3 / (ms * 1e-3)


def decode_weight_bytes(engine: Engine) -> int:
    """Bytes of weights one decode step reads: every layer, the final norm and the LM head (not the embedding
    table, of which it reads B rows, unless the head is tied to it)."""
    m = engine.model
    seen, total = set(), 0
    for name, p in m.named_parameters():
        if p.data_ptr() in seen or (name == "embed_tokens.weight" and not engine.cfg.tie_embeddings):
            continue
        seen.add(p.data_ptr())
        total += p.numel() * p.element_size()
    return total


def plain_graph_step(engine: Engine, batch: int, cap: int,
                     ) -> tuple[Callable[[], None], Callable[[int], None], Callable[[], None]]:
    """A plain PyTorch decode step (separate q/k/v and gate/up matmuls, masked matmul attention over a static cache of
    `cap` tokens in gpt-fast's [B, Hkv, cap, D] layout, every row at the same position), captured in one CUDA graph.
    Returns (replay, set_position, the uncaptured step)."""
    m, cfg, dt = engine.model, engine.cfg, engine.dtype
    H, Hkv, D = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    kc = torch.randn(cfg.n_layers, batch, Hkv, cap, D, device="cuda", dtype=dt)
    vc = torch.randn_like(kc)
    tokens = torch.randint(0, cfg.vocab_size, (batch, 1), device="cuda")
    pos = torch.zeros(1, dtype=torch.long, device="cuda")  # one position for the whole batch, as in gpt-fast

    def step() -> None:
        x = m.embed_tokens(tokens)
        cos, sin = rope_cos_sin(m.inv_freq, pos.expand(batch, 1), dt)
        mask = (torch.arange(cap, device="cuda") <= pos)[None, None, None]
        for i, blk in enumerate(m.layers):
            a = blk.self_attn
            h = blk.input_layernorm(x)
            # GQA as a query group per KV head: two batched matmuls read each K and V element once (SDPA's
            # fused kernels get only batch x KV-head thread blocks for this shape and run 3x slower)
            q = apply_rope(a.q_proj(h).view(batch, 1, H, D), cos, sin).view(batch, Hkv, H // Hkv, D)
            kc[i][:, :, pos] = apply_rope(a.k_proj(h).view(batch, 1, Hkv, D), cos, sin).transpose(1, 2)
            vc[i][:, :, pos] = a.v_proj(h).view(batch, 1, Hkv, D).transpose(1, 2)
            scores = (q @ kc[i].transpose(-1, -2)).float() * D ** -0.5
            o = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1).to(dt) @ vc[i]
            x = x + a.o_proj(o.reshape(batch, 1, H * D))
            x = x + blk.mlp(blk.post_attention_layernorm(x))
        m.lm_head(m.norm(x))
        pos.add_(1)

    with torch.inference_mode():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
    return graph.replay, lambda p: pos.fill_(p), step


def decode_row(engine: Engine, shape: str, batch: int, context: int, steps: int, reps: int, bw: float,
               eager: bool) -> dict[str, Any]:
    """Mean step time over `steps` steps from `context` tokens of random KV (median of reps)."""
    cfg = engine.cfg
    kv = engine.new_kv(batch, context + steps + 1)
    kv.k.normal_()
    kv.v.normal_()
    tokens = torch.randint(0, cfg.vocab_size, (batch,)).tolist()

    def run() -> None:
        kv.lengths[:] = [context] * batch
        for _ in range(steps):
            engine.decode(tokens, kv, slice(0, batch))

    step_ms = _events_ms(run, reps) / steps
    gemv: dict[str, Any] = {}
    if engine.graphs is not None:  # the same step with the kernel choices forced: before/after side by side
        from services.engine.graphs import DecodeGraphs

        b = bucket_for(batch)
        default = engine.graphs
        gemv["plan"] = default.plans[b].summary() if b in default.plans else None
        gemv["step"] = default.step_choice.get(b)
        # off: cuBLAS projections, no PDL, RoPE in a kernel of its own (the step before this work); auto_nopdl:
        # the projection plans as by default, without PDL; on: the Triton projection forced everywhere (PDL tried
        # as by default); rope_unfused: the default but RoPE + the KV write in a kernel before attention;
        # attn_legacy: the default but attention tiled as before attn_tiles (graphs.attn_tiles "legacy")
        for name, mode, pdl, fuse, attn in (("off", "off", False, False, "legacy"),
                                            ("auto_nopdl", "auto", False, True, "tuned"),
                                            ("on", "on", None, True, "tuned"),
                                            ("rope_unfused", "auto", None, False, "tuned"),
                                            ("attn_legacy", "auto", None, True, "legacy")):
            engine.graphs = DecodeGraphs(engine.model, mode, pdl, fuse_rope=fuse, attn=attn)
            try:
                gemv[f"step_ms_{name}"] = _events_ms(run, reps) / steps
                gemv[f"step_{name}"] = engine.graphs.step_choice.get(b)
            finally:
                engine.graphs = default
            torch.cuda.empty_cache()
    eager_ms = None
    if eager:
        graphs, engine.graphs = engine.graphs, None
        try:
            eager_ms = _events_ms(run, 1) / steps
        finally:
            engine.graphs = graphs
    graphed = engine.graphs is not None and bucket_for(batch) in engine.graphs.graphs
    kv.lengths[:] = [0] * batch
    kv.resize(1, 1)  # free the buffer before the baseline allocates its own
    replay, set_pos, _ = plain_graph_step(engine, batch, -(-(context + steps + 1) // 64) * 64)

    def run_plain() -> None:
        set_pos(context)
        for _ in range(steps):
            replay()

    base_ms = _events_ms(run_plain, reps) / steps
    torch.cuda.empty_cache()
    wbytes = decode_weight_bytes(engine)
    kv_bytes = batch * (context + (steps + 1) / 2) * cfg.kv_bytes_per_token(engine.model.lm_head.weight.element_size())
    roof_ms = (wbytes + kv_bytes) / bw * 1e3
    return {"shape": shape, "batch": batch, "context": context, "dtype": str(engine.dtype).removeprefix("torch."),
            "step_ms": step_ms, "roofline_ms": roof_ms, "roofline_share": roof_ms / step_ms,
            "baseline_graph_step_ms": base_ms, "baseline_roofline_share": roof_ms / base_ms,
            "eager_step_ms": eager_ms, "gemv_mode": engine.graphs.gemv_mode if engine.graphs else None,
            "step_ms_gemv_off": gemv.get("step_ms_off"), "step_ms_gemv_on": gemv.get("step_ms_on"),
            "step_ms_auto_no_pdl": gemv.get("step_ms_auto_nopdl"),
            "step_ms_rope_unfused": gemv.get("step_ms_rope_unfused"),
            "step_ms_attn_legacy": gemv.get("step_ms_attn_legacy"), "step_variant": gemv.get("step"),
            "step_variant_no_pdl": gemv.get("step_auto_nopdl"), "step_variant_on": gemv.get("step_on"),
            "roofline_share_gemv_off": roof_ms / gemv["step_ms_off"] if "step_ms_off" in gemv else None,
            "gemv_plan": gemv.get("plan"), "weight_bytes": wbytes, "kv_bytes_read": int(kv_bytes),
            "tokens_per_s": batch / step_ms * 1e3, "path": "cuda-graph" if graphed else "eager"}


def prefill_flops(cfg: ModelConfig, tokens: int) -> float:
    """Matmul FLOPs of one prompt: 2 per weight per token, causal attention, the LM head on the last token."""
    per_layer = cfg.dim * (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim + cfg.n_heads * cfg.head_dim * cfg.dim \
        + 3 * cfg.dim * cfg.hidden_dim
    attn = 2 * cfg.n_heads * cfg.head_dim * tokens * tokens  # QK^T and PV, half of each under the causal mask
    return cfg.n_layers * (2 * per_layer * tokens + attn) + 2 * cfg.dim * cfg.vocab_size


def prefill_row(engine: Engine, shape: str, tokens: int, reps: int, peak: float) -> dict[str, Any]:
    kv = engine.new_kv(1, tokens)
    ids = torch.randint(0, engine.cfg.vocab_size, (tokens,)).tolist()
    ms = _events_ms(lambda: engine.prefill([ids], kv, [0]), reps)
    flops = prefill_flops(engine.cfg, tokens)
    return {"shape": shape, "tokens": tokens, "prefill_ms": ms, "tflops": flops / ms * 1e-9,
            "mfu": flops / (ms * 1e-3) / peak}


def run_roofline(rows: list[tuple[str, int, int]], steps: int, reps: int, json_out: Path | None,
                 prefill: tuple[int, ...] = PREFILL_TOKENS, eager: bool = True) -> dict[str, Any]:
    torch.manual_seed(0)
    bw, peak = copy_bandwidth(), matmul_peak()
    res: dict[str, Any] = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                           "copy_bandwidth_GBps": bw / 1e9, "bf16_matmul_peak_TFLOPs": peak / 1e12,
                           "steps": steps, "reps": reps, "rows": [], "prefill": []}
    for shape in dict.fromkeys(r[0] for r in rows):
        engine = random_on_device(SHAPES[shape], "cuda", torch.bfloat16, shape)
        for _, batch, context in (r for r in rows if r[0] == shape):
            row = decode_row(engine, shape, batch, context, steps, reps, bw, eager)
            res["rows"].append(row)
            _print_row(row)
        if shape == "llama-3.2-1b":
            for n in prefill:
                row = prefill_row(engine, shape, n, reps, peak)
                res["prefill"].append(row)
                print(f"prefill {shape} {n:>5} tokens: {row['prefill_ms']:.2f} ms, {row['tflops']:.0f} TFLOP/s, "
                      f"MFU {row['mfu']:.0%}", flush=True)
        del engine
        torch.cuda.empty_cache()
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s, bf16 matmul peak {peak / 1e12:.0f} TFLOP/s")
    if json_out is not None:
        json_out.write_text(json.dumps(res, indent=1) + "\n")
    return res


def _print_row(r: dict[str, Any]) -> None:
    eager = f" | eager {r['eager_step_ms']:.2f} ms" if r["eager_step_ms"] is not None else ""
    gemv = ""
    if r.get("step_ms_gemv_off") is not None:
        gemv = (f" | cuBLAS projections, no PDL {r['step_ms_gemv_off']:.3f} ms ({r['roofline_share_gemv_off']:.0%}), "
                f"planned, no PDL {r['step_ms_auto_no_pdl']:.3f} ms, Triton forced {r['step_ms_gemv_on']:.3f} ms, "
                f"RoPE kernel apart {r['step_ms_rope_unfused']:.3f} ms, attention tiled as before "
                f"{r['step_ms_attn_legacy']:.3f} ms")
    print(f"{r['shape']} B={r['batch']} ctx {r['context']}: engine {r['step_ms']:.3f} ms "
          f"({r['roofline_share']:.0%} of roofline {r['roofline_ms']:.3f} ms) | plain graph "
          f"{r['baseline_graph_step_ms']:.3f} ms ({r['baseline_roofline_share']:.0%}){eager}{gemv} [{r['path']}]",
          flush=True)
    if r.get("step_variant"):
        v = r["step_variant"]
        print(f"  step kept: plan {v['plan']}, pdl {v['pdl']}, {v['choices']}; replay us {v.get('replay_us')}",
              flush=True)


def parse_rows(batches: str, context: int, smollm_context: int = 256) -> list[tuple[str, int, int]]:
    """`--batches 1,8,32,64` -> Llama-1B rows at `context`, plus the SmolLM2 batch-1 row."""
    from services.contracts.errors import InvalidArgument

    try:
        bs = [int(x) for x in batches.split(",") if x.strip()]
    except ValueError:
        raise InvalidArgument(f"--batches must be comma-separated integers (got {batches!r})", param="batches") from None
    if not bs or any(b < 1 or b > 1024 for b in bs):
        raise InvalidArgument(f"--batches must list integers in 1..1024 (got {batches!r})", param="batches")
    if context < 1:
        raise InvalidArgument(f"--context must be >= 1 (got {context})", param="context")
    return [("llama-3.2-1b", b, context) for b in bs] + [("smollm2-135m", 1, smollm_context)]


if __name__ == "__main__":  # GPU box entry point (no CLI dependencies): python -m services.bench.roofline --json F
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", default="1,8,16,32,64")
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-eager", action="store_true")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    run_roofline(parse_rows(a.batches, a.context), a.steps, a.repeats, a.json, eager=not a.no_eager)
