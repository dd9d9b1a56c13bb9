"""`tandem demo`: the plan -> deploy -> verify loop on one machine, in one command.

Starts the one-machine split cluster on the embedded model, answers a few requests over HTTP and gRPC, profiles
the engine (quick plan, overheads through the running gateway), replays a short scaled conversation trace, simulates
the same layout on the same requests with the fresh profile, and prints predicted vs measured.
"""

from __future__ import annotations

import json
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from rich.console import Console

from services.bench.cluster import Scaling, bench, running_cluster, scaled_workload
from services.bench.compare import HEADLINE, compare, plot_cdfs, table
from services.bench.load import write_trace


def _http(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())


def ask(lay: Any, console: Console) -> None:
    """Three answers: HTTP completion, HTTP chat, gRPC stream."""
    import grpc

    from services.rpc.tandem.v1 import generation_pb2 as gpb
    from services.rpc.tandem.v1 import generation_pb2_grpc as gpb_grpc

    base = f"http://{lay.gateway.http}/v1"
    r = _http(f"{base}/completions", {"model": lay.model.name, "prompt": "The capital of France is",
                                      "max_tokens": 12, "temperature": 0})
    console.print(f"[bold]HTTP /v1/completions[/] 'The capital of France is' -> {r['choices'][0]['text']!r}")
    r = _http(f"{base}/chat/completions", {"model": lay.model.name, "max_tokens": 24, "temperature": 0,
                                           "messages": [{"role": "user", "content": "Name a primary colour."}]})
    console.print(f"[bold]HTTP /v1/chat/completions[/] 'Name a primary colour.' -> "
                  f"{r['choices'][0]['message']['content']!r}")
    with grpc.insecure_channel(lay.gateway.grpc) as ch:
        text, workers = "", []
        for msg in gpb_grpc.GenerationStub(ch).Generate(gpb.GenerateRequest(
                text="Once upon a time", sampling=gpb.SamplingOptions(max_tokens=16, temperature=0.0)), timeout=120):
            text += msg.text
            workers = list(msg.workers) or workers
    console.print(f"[bold]gRPC tandem.v1.Generation/Generate[/] 'Once upon a time' -> {text!r} (served by "
                  f"{' then '.join(workers)})")


def run_demo(layout: Path, rate: float, duration: float, plot: Path, seed: int = 1) -> dict[str, Any]:
    from services.bench.verify_cli import profile_to
    from sim.cluster import simulate
    from sim.results import run_samples, summarize_run

    console = Console()
    t_start = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="tandem-demo-"))
    scaling = Scaling()
    w = scaled_workload("conv", rate, duration, seed, scaling)
    write_trace(w, work / "workload.csv")
    with running_cluster(layout, note=console.print) as (lay, served):
        ask(lay, console)
        console.rule("profile (quick): engine, scheduler, KV push, gateway overheads")
        profile_to(work / "profile.csv", str(served), None, None, "cpu", None, True, True, console)
        console.rule(f"replay: {len(w)} conv requests at {rate} req/s for {duration:.0f} s (scaled: prompt x "
                     f"{scaling.prompt_scale:.3g}, output x {scaling.output_scale:.3g})")
        measured = bench(lay, w)
    sim_layout = lay.model_copy(update={"sim": lay.sim.model_copy(update={"perf_model": str(work / "profile.csv")})})
    run = simulate(sim_layout, w, seed=seed)
    predicted = {**summarize_run(run), "samples": run_samples(run)}
    cmp = compare(predicted, measured)
    plot_cdfs(predicted, measured, plot, f"tandem demo: {lay.name}, conv (scaled), {rate} req/s")
    for name, data in (("predicted.json", predicted), ("measured.json", measured)):
        (work / name).write_text(json.dumps(data, default=float))
    console.print(f"files in {work}; CDFs in {plot}; {time.perf_counter() - t_start:.0f} s in all")
    head = {k: cmp[k] for k in ("predicted", "measured", "relative_error")}
    console.print(table({k: {m: v[m] for m in HEADLINE if m in v} for k, v in head.items()},
                        f"predicted vs measured: {lay.name}, {measured['completed']} requests"))
    return head
