"""`tandem bench engine`: single-stream decode, Tandem's engine vs transformers' generate."""

from __future__ import annotations

from pathlib import Path

import typer


def bench_engine(
    model: str | None = typer.Option(None, "--model", help="HF directory or .gguf file (default: SmolLM2-135M)."),
    prompt_tokens: int = typer.Option(128, "--prompt-tokens", help="Prompt length."),
    new_tokens: int = typer.Option(64, "--new-tokens", help="Tokens decoded per run."),
    repeats: int = typer.Option(3, "--repeats", help="Runs per engine; the median is reported."),
    device: str | None = typer.Option(None, "--device", help="cpu or cuda (default: cuda when available)."),
    random_weights: bool = typer.Option(False, "--random", help="Random weights of SmolLM2's shapes (no files)."),
    threads: int | None = typer.Option(None, "--threads", help="CPU threads for both runtimes (default: torch's)."),
    json_out: Path | None = typer.Option(None, "--json", help="Also write the results as JSON here."),
) -> None:
    """Single-stream decode tokens/s: Tandem's engine vs transformers' generate on the same weights."""
    import torch

    from services.bench.engine import run_bench
    from services.contracts.errors import InvalidArgument

    if threads is not None:
        if threads < 1:
            raise InvalidArgument(f"--threads must be >= 1 (got {threads})", param="threads")
        torch.set_num_threads(threads)
    run_bench(model=model, prompt_tokens=prompt_tokens, new_tokens=new_tokens, repeats=repeats, device=device,
              json_out=json_out, random_weights=random_weights)
