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
    roofline: bool = typer.Option(False, "--roofline", help="CUDA: decode step vs a plain graphed PyTorch step and "
                                  "the HBM roofline at Llama-3.2-1B and SmolLM2 shapes, and prefill MFU."),
    batches: str = typer.Option("1,8,16,32,64", "--batches", help="With --roofline: Llama-1B batch sizes."),
    context: int = typer.Option(1024, "--context", help="With --roofline: tokens of KV per row."),
    steps: int = typer.Option(32, "--steps", help="With --roofline: decode steps per timed run."),
) -> None:
    """Single-stream decode tokens/s: Tandem's engine vs transformers' generate on the same weights."""
    from services.contracts.errors import InvalidArgument

    if roofline:
        _roofline(batches, context, steps, repeats, device, json_out)
        return
    import torch

    from services.bench.engine import run_bench

    if threads is not None:
        if threads < 1:
            raise InvalidArgument(f"--threads must be >= 1 (got {threads})", param="threads")
        torch.set_num_threads(threads)
    run_bench(model=model, prompt_tokens=prompt_tokens, new_tokens=new_tokens, repeats=repeats, device=device,
              json_out=json_out, random_weights=random_weights)


def _roofline(batches: str, context: int, steps: int, repeats: int, device: str | None, json_out: Path | None) -> None:
    """`--roofline`: validate what needs no GPU first, so a typo fails before torch loads."""
    from services.bench.roofline import parse_rows
    from services.contracts.errors import InvalidArgument

    rows = parse_rows(batches, context)
    if steps < 1 or repeats < 1:
        raise InvalidArgument("--steps and --repeats must be >= 1", param="steps")
    if device is not None and device != "cuda" and not device.startswith("cuda:"):
        raise InvalidArgument(f"--roofline measures a CUDA GPU; --device {device!r} is not one", param="device")
    import torch

    if not torch.cuda.is_available():
        raise InvalidArgument("--roofline needs a CUDA GPU, and CUDA is not available on this machine",
                              param="device")
    from services.bench.roofline import run_roofline

    if device is not None and ":" in device:
        torch.cuda.set_device(device)
    run_roofline(rows, steps=steps, reps=max(repeats, 5), json_out=json_out)
