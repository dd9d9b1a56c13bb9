"""`tandem bench kv`: KV transfer throughput over gRPC vs raw TCP, and TTFT split vs mixed."""

from __future__ import annotations

from pathlib import Path

import typer


def bench_kv(
    json_out: Path = typer.Option(None, "--json", help="write the results as JSON here"),
    tokens: int = typer.Option(4096, help="tokens of KV per transfer (8 layers x 8 heads x 128, f32)"),
    repeats: int = typer.Option(4, min=1, help="timed transfers per transport (best is reported)"),
    chunk_mb: float = typer.Option(1.0, help="gRPC piece size in MiB (1-4)"),
    ttft: bool = typer.Option(False, "--ttft", help="also TTFT split vs mixed (slow on CPU)"),
    ttft_model: str = typer.Option(None, help="model spec for --ttft (default: the embedded SmolLM2)"),
    lengths: str = typer.Option("128,512,1024,2048,4096", help="prompt lengths for --ttft"),
    ttft_repeats: int = typer.Option(1, min=1, help="interleaved runs per length for --ttft (best is kept)"),
    ttft_dtype: str = typer.Option(None, help="dtype of a --ttft-model given as a shape name (e.g. llama-3.2-1b): "
                                   "float32, bfloat16 or float16"),
    prefill_device: str = typer.Option(None, help="--ttft: 'cpu' or 'cuda:N' for both prefill workers "
                                       "(each worker pinned with CUDA_VISIBLE_DEVICES=N)"),
    decode_device: str = typer.Option(None, help="--ttft: 'cpu' or 'cuda:N' for the decode worker"),
    mixed_device: str = typer.Option(None, help="--ttft: 'cpu' or 'cuda:N' for the mixed worker"),
    worker_log: Path = typer.Option(None, help="--ttft: append the workers' stderr to this file"),
    skip_throughput: bool = typer.Option(False, "--skip-throughput", help="with --ttft: skip the gRPC vs raw TCP run"),
    kv_path: str = typer.Option(None, help="--ttft: KV paths to measure side by side, comma-separated: grpc (bytes), "
                                "ipc (CUDA IPC; prefill and decode on one GPU), auto (default: grpc)"),
) -> None:
    """KV transfer throughput over gRPC vs raw TCP on loopback (ratio); optionally TTFT split vs mixed."""
    import json

    from rich.console import Console
    from rich.progress import Progress

    from services.bench.kv import check_kv_paths, kv_throughput, model_for_ttft, worker_device
    from services.bench.kv import ttft as run_ttft
    from services.contracts.errors import InvalidArgument
    from services.kv.wire import check_chunk_bytes

    chunk = check_chunk_bytes(int(chunk_mb * 2**20))
    if tokens < 1:
        raise InvalidArgument(f"tokens must be >= 1 (got {tokens})", param="tokens")
    try:
        lens = [int(x) for x in lengths.split(",") if x.strip()]
    except ValueError:
        raise InvalidArgument(f"lengths must be comma-separated integers (got {lengths!r})", param="lengths") from None
    if ttft and (not lens or min(lens) < 1):
        raise InvalidArgument("lengths must be positive", param="lengths")
    devices = {"prefill": prefill_device, "decode": decode_device, "mixed": mixed_device}
    for role, dev in devices.items():
        worker_device(dev, f"--{role}-device")  # a malformed device fails before any worker starts
    placed = any(d is not None for d in devices.values())
    if not ttft and (placed or ttft_dtype or skip_throughput or kv_path is not None):
        raise InvalidArgument("--prefill/decode/mixed-device, --ttft-dtype, --kv-path and --skip-throughput apply to "
                              "--ttft only", param="ttft")
    paths = check_kv_paths(kv_path or "grpc", devices)
    spec = model_for_ttft(ttft_model, ttft_dtype, lens) if ttft else None
    console = Console()
    res: dict = {}
    if not skip_throughput:
        with console.status("KV transfer: gRPC vs raw TCP ..."):
            res = kv_throughput(tokens, repeats, chunk)
        _throughput_table(console, res, tokens)
    if ttft:
        res["ttft_setup"] = {"model": spec, "devices": devices, "lengths": lens, "repeats": ttft_repeats,
                             "kv_paths": paths}
        log = open(worker_log, "a") if worker_log else None  # noqa: SIM115 - closed below
        try:
            with Progress(console=console) as prog:
                task = prog.add_task("TTFT split vs mixed", total=len(lens) + 1)
                done: list[dict] = []

                def rows_done(rows: list[dict] | None) -> None:  # the JSON so far after every length (a run cut short keeps it)
                    prog.advance(task)
                    if rows is not None and json_out:
                        done.extend(rows)
                        json_out.write_text(json.dumps({**res, "ttft": done, "partial": True}, indent=2))

                rows = run_ttft(spec, lens, progress=rows_done, repeats=ttft_repeats, devices=devices, log=log,
                                kv_paths=paths)
        finally:
            if log:
                log.close()
        res["ttft"] = rows
        _ttft_table(console, rows)
    if json_out:
        json_out.write_text(json.dumps(res, indent=2))
        console.print(f"wrote {json_out}")


def _throughput_table(console, res: dict, tokens: int) -> None:
    from rich.table import Table

    t = Table(title=f"KV push of {res['bytes_per_transfer'] / 2**20:.0f} MiB ({tokens} tokens), loopback")
    for col in ("transport", "Gbit/s"):
        t.add_column(col)
    t.add_row("gRPC (kvwire + crc32 + validation)", f"{res['grpc_gbps']:.2f}")
    t.add_row("raw TCP (same bytes)", f"{res['raw_tcp_gbps']:.2f}")
    t.add_row("ratio gRPC / raw", f"{res['ratio']:.3f}")
    t.add_row("crc32 alone (one core)", f"{res['crc32_gbps']:.2f}")
    console.print(t)


def _ttft_table(console, rows: list[dict]) -> None:
    from rich.table import Table

    t = Table(title="TTFT: prefill -> KV push -> decode worker vs mixed worker")
    for col in ("prompt", "KV path (used)", "split s", "split, push after s", "mixed s", "split/mixed", "prefill s",
                "KV exposed s", "KV exposed, push after s", "KV MiB", "tokens = mixed"):
        t.add_column(col)
    for r in rows:
        used = r["kv_path_used"] if r["kv_path_used"] == r["kv_path_serial_used"] else \
            f"{r['kv_path_used']} / {r['kv_path_serial_used']}"
        t.add_row(str(r["prompt_tokens"]), f"{r['kv_path']} ({used})", f"{r['split_ttft_s']:.4f}",
                  f"{r['split_serial_ttft_s']:.4f}", f"{r['mixed_ttft_s']:.4f}", f"{r['ratio']:.3f}",
                  f"{r['prefill_s']:.4f}", f"{r['kv_exposed_s']:.4f}", f"{r['kv_serial_s']:.4f}",
                  f"{r['kv_bytes'] / 2**20:.1f}", "yes" if r["tokens_equal_mixed"] else "NO")
    console.print(t)
