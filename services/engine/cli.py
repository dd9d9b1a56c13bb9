"""`tandem generate`: one prompt, one process, text streamed to stdout."""

from __future__ import annotations

import sys
from collections.abc import Callable

import typer


def register(group: Callable[[str], typer.Typer]) -> None:
    group("").command("generate")(generate_cmd)


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

    from services.contracts.errors import InvalidArgument
    from services.engine.generate import GenStats, generate_text
    from services.engine.loader import load_engine
    from services.engine.sampling import SamplingParams

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
