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
) -> None:
    """KV transfer throughput over gRPC vs raw TCP on loopback (ratio); optionally TTFT split vs mixed."""
    import json

    from rich.console import Console
    from rich.progress import Progress
    from rich.table import Table

    from services.bench.kv import kv_throughput
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
    console = Console()
    with console.status("KV transfer: gRPC vs raw TCP ..."):
        res = kv_throughput(tokens, repeats, chunk)
    t = Table(title=f"KV push of {res['bytes_per_transfer'] / 2**20:.0f} MiB ({tokens} tokens), loopback")
    for col in ("transport", "Gbit/s"):
        t.add_column(col)
    t.add_row("gRPC (kvwire + crc32 + validation)", f"{res['grpc_gbps']:.2f}")
    t.add_row("raw TCP (same bytes)", f"{res['raw_tcp_gbps']:.2f}")
    t.add_row("ratio gRPC / raw", f"{res['ratio']:.3f}")
    t.add_row("crc32 alone (one core)", f"{res['crc32_gbps']:.2f}")
    console.print(t)
    if ttft:
        with Progress(console=console) as prog:
            task = prog.add_task("TTFT split vs mixed", total=len(lens) + 1)
            rows = run_ttft(ttft_model, lens, progress=lambda: prog.advance(task), repeats=ttft_repeats)
        res["ttft"] = rows
        t = Table(title="TTFT: prefill -> KV push -> decode worker vs mixed worker")
        for col in ("prompt", "split s", "split, push after s", "mixed s", "split/mixed", "KV exposed s",
                    "KV exposed, push after s", "KV MiB"):
            t.add_column(col)
        for r in rows:
            t.add_row(str(r["prompt_tokens"]), f"{r['split_ttft_s']:.3f}", f"{r['split_serial_ttft_s']:.3f}",
                      f"{r['mixed_ttft_s']:.3f}", f"{r['ratio']:.3f}", f"{r['kv_exposed_s']:.4f}",
                      f"{r['kv_serial_s']:.4f}", f"{r['kv_bytes'] / 2**20:.1f}")
        console.print(t)
    if json_out:
        json_out.write_text(json.dumps(res, indent=2))
        console.print(f"wrote {json_out}")
