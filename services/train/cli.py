"""The training verbs, `tandem AREA train`: `tandem dlm train [--smollm2]` and `tandem policy train`."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import typer


def dlm_train_cmd(
    model: str | None = typer.Option(None, "--model", help="dlm or guide (not with --smollm2)"),
    smollm2: bool = typer.Option(False, "--smollm2", help="the SmolLM2-tokenizer DLM instead (CPU is enough; "
                                 "defaults: --seconds 420 --batch 128 --lr 3e-3 --threads 2, "
                                 "--out services/dlm/checkpoints/dlm_smollm2.pt)"),
    size: str | None = typer.Option(None, "--size", help="dlm, guide, weak or tiny (default: --model's)"),
    seconds: float | None = typer.Option(None, "--seconds", help="training time budget (default 180)"),
    out: Path | None = typer.Option(None, "--out", help="checkpoint folder to write (a .pt file with --smollm2)"),
    batch: int | None = typer.Option(None, "--batch", help="batch size (default 512)"),
    lr: float | None = typer.Option(None, "--lr", help="peak learning rate (default 2e-3)"),
    chunks: int = typer.Option(200, "--chunks", help="20k-example corpus chunks"),
    workers: int = typer.Option(4, "--workers", help="processes building the corpus"),
    device: str | None = typer.Option(None, "--device", help="cpu or cuda (default: cuda when available)"),
    threads: int | None = typer.Option(None, "--threads", help="torch CPU threads"),
    init: Path | None = typer.Option(None, "--init", help="fine-tune: start from this checkpoint"),
    sort_chunks: int = typer.Option(0, "--sort-chunks", help="extra 20k-example chunks of sorting only"),
    warmup: int = typer.Option(300, "--warmup", help="linear warm-up steps"),
    name: str | None = typer.Option(None, "--name", help="output file name (default: <model>[_<size>].pt)"),
    examples: int = typer.Option(200_000, "--examples", help="with --smollm2: training examples"),
) -> None:
    """Train the diffusion LM (LLaDA masked objective) or its AR guide on the task corpus."""
    import torch

    from services.contracts.errors import InvalidArgument

    if smollm2:
        from services.dlm.smol import SMOL_CHECKPOINT
        from services.train import dlm_smol

        if model is not None:
            raise InvalidArgument("--model: --smollm2 trains the SmolLM2-tokenizer DLM only", param="model")
        torch.set_num_threads(threads or 2)
        dlm_smol.train(420 if seconds is None else seconds, out or SMOL_CHECKPOINT, batch or 128,
                       3e-3 if lr is None else lr, examples)
        return
    from services.train import dlm

    if model not in ("dlm", "guide"):
        raise InvalidArgument(f"--model: dlm or guide (got {model!r})", param="model")
    if size is not None and size not in dlm.SIZES:
        raise InvalidArgument(f"--size: one of {', '.join(sorted(dlm.SIZES))} (got {size!r})", param="size")
    if out is None:
        raise InvalidArgument("--out: the checkpoint folder to write is required", param="out")
    if threads:
        torch.set_num_threads(threads)
    out.mkdir(parents=True, exist_ok=True)
    dlm.train(model, size or model, 180 if seconds is None else seconds, out, batch or 512, 2e-3 if lr is None else lr,
              chunks, workers, device or ("cuda" if torch.cuda.is_available() else "cpu"), init, sort_chunks, warmup,
              name)


def policy_train_cmd(
    out: Path = typer.Option(..., "--out", help="checkpoint directory to write"),
    seconds: float = typer.Option(150, "--seconds", help="training time budget"),
    episodes: int = typer.Option(3000, "--episodes", help="expert demonstrations"),
    max_steps: int = typer.Option(10**7, "--max-steps", help="optimizer steps at most"),
    batch: int = typer.Option(1024, "--batch"),
    lr: float = typer.Option(3e-4, "--lr"),
    n_layer: int = typer.Option(6, "--n-layer", help="transformer layers"),
    n_emb: int = typer.Option(128, "--n-emb", help="embedding width"),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda"),
) -> None:
    """Train a checkpoint on scripted-expert demonstrations (the committed one was trained on a GPU)."""
    from services.policy import checkpoint as ckpt
    from services.policy.model import DenoiserConfig
    from services.train import policy as train

    model, norm, info = train.train(DenoiserConfig(n_layer=n_layer, n_emb=n_emb), episodes, seconds, max_steps, batch,
                                    lr, device)
    ckpt.save(model, norm, out, info)
    typer.echo(f"wrote {out}: {info}")


def register(group: Callable[[str], typer.Typer]) -> None:
    group("dlm").command("train")(dlm_train_cmd)
    group("policy").command("train")(policy_train_cmd)
