"""`tandem generate` (one prompt, one process) and `tandem bench engine` (our decode vs transformers')."""

from __future__ import annotations

import sys
from pathlib import Path

import typer


def register(app: typer.Typer, bench_app: typer.Typer) -> None:
    app.command("generate")(generate_cmd)
    bench_app.command("engine")(bench_engine_cmd)


def generate_cmd(
    prompt: str = typer.Argument(..., help="The prompt (or the user message with --chat)."),
    max_tokens: int = typer.Option(64, "--max-tokens", help="Tokens to generate at most."),
    temperature: float = typer.Option(0.7, "--temperature", help="0 = greedy."),
    top_k: int = typer.Option(0, "--top-k", help="Sample among the k most likely tokens (0 = off)."),
    top_p: float = typer.Option(1.0, "--top-p", help="Nucleus sampling mass in (0, 1]."),
    seed: int | None = typer.Option(None, "--seed", help="Seed for reproducible sampling."),
    stop: list[str] = typer.Option([], "--stop", help="Stop string (repeatable); not printed."),
    chat: bool = typer.Option(False, "--chat", help="Wrap the prompt in the model's chat template."),
    model: str | None = typer.Option(None, "--model", help="HF directory or .gguf file (default: SmolLM2-135M)."),
    device: str | None = typer.Option(None, "--device", help="cpu or cuda (default: cuda when available)."),
) -> None:
    """Generate a continuation: text on stdout as it streams; timings and tokens/s on stderr."""
    import time

    from services.engine.generate import GenStats, generate_text
    from services.engine.loader import load_engine
    from services.engine.sampling import SamplingParams
    from services.errors import InvalidArgument

    # Validate what needs no model first, so a typo fails in milliseconds.
    params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                            stop=tuple(stop)).validate()
    if device is not None and device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise InvalidArgument(f"--device must be cpu or cuda (got {device!r})", param="device")
    t0 = time.perf_counter()
    engine = load_engine(model, device=device)
    load_s = time.perf_counter() - t0
    if engine.tokenizer is None:
        raise InvalidArgument(f"model {model!r} has no tokenizer (tokenizer.json)", param="model")
    tok = engine.tokenizer
    ids = tok.encode_chat([{"role": "user", "content": prompt}]) if chat else tok.encode(prompt)
    stats = GenStats()
    out = sys.stdout
    for delta in generate_text(engine, ids, params, stats):
        out.write(delta)
        out.flush()
    if out.isatty():
        out.write("\n")
    prefill_tps = stats.prompt_tokens / stats.prefill_s if stats.prefill_s else 0.0
    typer.echo(f"[{engine.name} on {engine.device} {str(engine.dtype).removeprefix('torch.')}] "
               f"load {load_s:.2f} s | prompt {stats.prompt_tokens} tok, prefill {stats.prefill_s * 1e3:.1f} ms "
               f"({prefill_tps:.0f} tok/s) | {stats.completion_tokens} tok generated, decode "
               f"{stats.decode_tokens_per_s:.1f} tok/s | finish: {stats.finish_reason}", err=True)


def bench_engine_cmd(
    model: str | None = typer.Option(None, "--model", help="HF directory or .gguf file (default: SmolLM2-135M)."),
    prompt_tokens: int = typer.Option(128, "--prompt-tokens", help="Prompt length."),
    new_tokens: int = typer.Option(64, "--new-tokens", help="Tokens decoded per run."),
    repeats: int = typer.Option(3, "--repeats", help="Runs per engine; the median is reported."),
    device: str | None = typer.Option(None, "--device", help="cpu or cuda (default: cuda when available)."),
    random_weights: bool = typer.Option(False, "--random", help="Random weights of SmolLM2's shapes (no files)."),
    threads: int | None = typer.Option(None, "--threads", help="CPU threads for both runtimes (default: torch's)."),
    json_out: Path | None = typer.Option(None, "--json", help="Also write the results as JSON here."),
    roofline: bool = typer.Option(False, "--roofline", help="CUDA: decode step vs a plain graphed PyTorch step and "
                                  "the HBM roofline at Llama-3.2-1B and SmolLM2 shapes, and prefill MFU."),
    batches: str = typer.Option("1,8,16,32,64", "--batches", help="With --roofline: Llama-1B batch sizes."),
    context: int = typer.Option(1024, "--context", help="With --roofline: tokens of KV per row."),
    steps: int = typer.Option(32, "--steps", help="With --roofline: decode steps per timed run."),
) -> None:
    """Single-stream decode tokens/s: Tandem's engine vs transformers' generate on the same weights."""
    if roofline:
        from services.engine.roofline import parse_rows
        from services.errors import InvalidArgument

        rows = parse_rows(batches, context)
        if steps < 1 or repeats < 1:
            raise InvalidArgument("--steps and --repeats must be >= 1", param="steps")
        if device is not None and device != "cuda" and not device.startswith("cuda:"):
            raise InvalidArgument(f"--roofline measures a CUDA GPU; --device {device!r} is not one", param="device")
        import torch

        if not torch.cuda.is_available():
            raise InvalidArgument("--roofline needs a CUDA GPU, and CUDA is not available on this machine",
                                  param="device")
        from services.engine.roofline import run_roofline

        if device is not None and ":" in device:
            torch.cuda.set_device(device)
        run_roofline(rows, steps=steps, reps=max(repeats, 5), json_out=json_out)
        return
    import torch

    from services.engine.bench import run_bench
    from services.errors import InvalidArgument

    if threads is not None:
        if threads < 1:
            raise InvalidArgument(f"--threads must be >= 1 (got {threads})", param="threads")
        torch.set_num_threads(threads)
    run_bench(model=model, prompt_tokens=prompt_tokens, new_tokens=new_tokens, repeats=repeats, device=device,
              json_out=json_out, random_weights=random_weights)
