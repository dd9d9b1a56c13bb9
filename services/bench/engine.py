"""Single-stream decode benchmark: Tandem's engine vs transformers' generate on identical weights, same run."""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from services.engine.engine import Engine
from services.engine.generate import GenStats, generate
from services.engine.sampling import SamplingParams

SMOLLM2_SHAPES = dict(vocab_size=49152, dim=576, n_layers=30, n_heads=9, n_kv_heads=3, hidden_dim=1536,
                      rope_theta=100000.0, max_seq_len=8192, tie_embeddings=True, eos_ids=(2,))


def to_transformers(engine: Engine) -> Any:
    """A transformers LlamaForCausalLM holding exactly our weights (so only the runtimes differ)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = engine.cfg
    hf_cfg = LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.hidden_dim,
                         num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
                         num_key_value_heads=cfg.n_kv_heads, head_dim=cfg.head_dim, rms_norm_eps=cfg.norm_eps,
                         rope_theta=cfg.rope_theta, rope_scaling=cfg.rope_scaling,
                         max_position_embeddings=cfg.max_seq_len, tie_word_embeddings=cfg.tie_embeddings,
                         attention_bias=cfg.attention_bias, bos_token_id=cfg.bos_id,
                         eos_token_id=list(cfg.eos_ids) or None)
    with torch.device("meta"):
        model = LlamaForCausalLM(hf_cfg)
    state = {("model." + k if k != "lm_head.weight" else k): v for k, v in engine.model.state_dict().items()}
    model.load_state_dict(state, strict=False, assign=True)
    if cfg.tie_embeddings:
        model.tie_weights()
    model.model.rotary_emb.inv_freq = engine.model.inv_freq.clone()
    model.model.rotary_emb.original_inv_freq = engine.model.inv_freq.clone()
    return model.eval()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_ours(engine: Engine, prompt: list[int], n: int) -> tuple[float, float, list[int]]:
    """(wall seconds, CPU seconds of this process, generated ids)."""
    _sync(engine.device)
    t, c = time.perf_counter(), time.process_time()
    ids = list(generate(engine, prompt, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True), GenStats()))
    _sync(engine.device)
    return time.perf_counter() - t, time.process_time() - c, ids


@torch.inference_mode()
def time_hf(model: Any, prompt: list[int], n: int, device: torch.device) -> tuple[float, float, list[int]]:
    x = torch.tensor([prompt], device=device)
    _sync(device)
    t, c = time.perf_counter(), time.process_time()
    out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                         pad_token_id=0)
    _sync(device)
    return time.perf_counter() - t, time.process_time() - c, out[0, len(prompt):].tolist()


def run_bench(model: str | None, prompt_tokens: int, new_tokens: int, repeats: int, device: str | None,
              json_out: Path | None, random_weights: bool = False) -> dict[str, Any]:
    """Decode tok/s = (new_tokens - 1) / (t(prompt + new_tokens) - t(prompt + 1)); median over repeats.

    On CPU it is also reported per CPU-second of the process (`*_per_cpu_s`): on a machine shared with other
    jobs, wall time mostly measures the neighbours, CPU time the work (exact with one thread)."""
    from services.contracts.errors import InvalidArgument

    # decode time is a difference of two runs; fewer new tokens drown it in prefill noise
    if new_tokens < 16 or prompt_tokens < 1 or repeats < 1:
        raise InvalidArgument("need --new-tokens >= 16, --prompt-tokens >= 1, --repeats >= 1", param="new_tokens")
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise InvalidArgument("the engine benchmark compares against transformers: pip install transformers",
                              param="transformers") from None
    if random_weights:
        from services.engine.config import ModelConfig
        from services.engine.engine import random_engine
        from services.engine.loader import resolve_device

        dev, dt = resolve_device(device, None)
        engine = random_engine(ModelConfig(**SMOLLM2_SHAPES), device=dev, dtype=dt, name="random SmolLM2-135M shapes")
    else:
        from services.engine.loader import load_engine

        engine = load_engine(model, device=device)
    hf = to_transformers(engine).to(device=engine.device, dtype=engine.dtype)
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(100, engine.cfg.vocab_size, (prompt_tokens,), generator=g).tolist()
    time_ours(engine, prompt, 4)  # warm-up both (allocator, kernels)
    time_hf(hf, prompt, 4, engine.device)
    runs: dict[str, list[tuple[tuple[float, float], tuple[float, float]]]] = {"tandem": [], "transformers": []}
    outs: dict[str, list[int]] = {}
    from rich.progress import Progress

    with Progress(transient=True, console=_stderr_console()) as bar:
        task = bar.add_task("interleaved runs", total=2 * repeats)
        for _ in range(repeats):  # interleaved, so both see the same machine load
            for name in runs:
                fn = (lambda n: time_ours(engine, prompt, n)) if name == "tandem" else \
                    (lambda n: time_hf(hf, prompt, n, engine.device))
                w1, c1, _ = fn(1)
                wn, cn, outs[name] = fn(new_tokens)
                runs[name].append(((w1, wn), (c1, cn)))
                bar.advance(task)
    res: dict[str, Any] = {"model": engine.name, "device": str(engine.device),
                           "dtype": str(engine.dtype).removeprefix("torch."), "threads": torch.get_num_threads(),
                           "prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "repeats": repeats}
    def rate(pairs: list[tuple[float, float]]) -> float:
        return statistics.median((new_tokens - 1) / max(tn - t1, 1e-9) for t1, tn in pairs)

    for name, rs in runs.items():
        res[f"{name}_decode_tok_s"] = rate([w for w, _ in rs])
        res[f"{name}_first_token_ms"] = statistics.median(w[0] for w, _ in rs) * 1e3
        if engine.device.type == "cpu":
            res[f"{name}_decode_tok_per_cpu_s"] = rate([c for _, c in rs])
    res["decode_speedup"] = res["tandem_decode_tok_s"] / res["transformers_decode_tok_s"]
    if engine.device.type == "cpu":
        res["decode_speedup_cpu_time"] = res["tandem_decode_tok_per_cpu_s"] / res["transformers_decode_tok_per_cpu_s"]
    res["greedy_tokens_agree"] = outs["tandem"] == outs["transformers"]
    _print(res)
    if json_out is not None:
        json_out.write_text(json.dumps(res, indent=1) + "\n")
    return res


def _stderr_console() -> Any:
    from rich.console import Console

    return Console(file=sys.stderr)


def _print(res: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"single-stream decode: {res['model']} on {res['device']} {res['dtype']}, "
                        f"{res['threads']} threads, prompt {res['prompt_tokens']}, {res['new_tokens']} new tokens")
    cpu = "tandem_decode_tok_per_cpu_s" in res
    for col in ("runtime", "decode tok/s (wall)", *(["decode tok per CPU-s"] if cpu else []), "first token ms"):
        table.add_column(col, justify="right")
    for name in ("tandem", "transformers"):
        extra = [f"{res[f'{name}_decode_tok_per_cpu_s']:.1f}"] if cpu else []
        table.add_row(name, f"{res[f'{name}_decode_tok_s']:.1f}", *extra, f"{res[f'{name}_first_token_ms']:.1f}")
    console = Console(file=sys.stdout)
    console.print(table)
    by_cpu = f"; by CPU time {res['decode_speedup_cpu_time']:.2f}x" if cpu else ""
    console.print(f"decode speed-up (tandem / transformers): wall {res['decode_speedup']:.2f}x{by_cpu}; "
                  f"greedy tokens agree: {res['greedy_tokens_agree']}")


if __name__ == "__main__":  # GPU box entry point: python -m services.bench.engine [--random] [--json FILE]
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--model")
    ap.add_argument("--device")
    ap.add_argument("--random", action="store_true")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    run_bench(a.model, a.prompt_tokens, a.new_tokens, a.repeats, a.device, a.json, a.random)
