"""`tandem bench cluster`: start (or attach to) a layout's cluster, replay a scaled trace through its gateway,
reduce the client-side token times with the simulator's metric code.

Scaling: the Azure traces' prompts (conv median ~1,020 tokens) and outputs (median ~130) take tens of seconds
per request on a 2-core CPU, so each request keeps its arrival time and gets round(prompt · prompt_scale) prompt
tokens and round(output · output_scale) output tokens, clipped to [min, max]. The scaled workload is written as a
trace CSV next to the result, so `tandem sim run LAYOUT --trace THAT.csv` predicts exactly what was replayed.
"""

from __future__ import annotations

import contextlib
import random
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from services.bench.load import measured_result, replay, scale_workload, stream_one, write_trace
from services.contracts.layout import Layout, load_layout
from sim.trace import Workload, make_workload


@dataclass(slots=True)
class Scaling:
    prompt_scale: float = 1 / 16
    output_scale: float = 1 / 8
    max_prompt: int = 256
    max_output: int = 32
    min_prompt: int = 4
    min_output: int = 2


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_block(n: int, taken: set[int]) -> int:
    """A base port b with b..b+n-1 and their metrics ports (+1000) free."""
    for _ in range(200):
        b = random.randint(20000, 40000)
        ports = [b + i for i in range(n)] + [b + 1000 + i for i in range(n)]
        if not taken & set(ports) and all(_port_free(p) for p in ports):
            taken.update(ports)
            return b
    raise RuntimeError("no free port block found")


def with_free_ports(layout_path: str | Path, dest: Path) -> Path:
    """The layout with every port (gateway, pools, metrics) moved to free ones: runs beside other clusters.
    The gateway's other settings (max_inflight, stall_s, drain_s) are kept."""
    doc = yaml.safe_load(Path(layout_path).read_text()) or {}
    taken: set[int] = set()
    for pool in doc.get("pools") or [{"role": "mixed", "count": 1}]:
        pool["base_port"] = _free_block(int(pool.get("count", 1)), taken)
    doc.setdefault("pools", [{"role": "mixed", "count": 1, "base_port": _free_block(1, taken)}])
    http, grpc_port = _free_block(1, taken), _free_block(1, taken)
    doc["gateway"] = {**(doc.get("gateway") or {}), "http": f"127.0.0.1:{http}", "grpc": f"127.0.0.1:{grpc_port}"}
    dest.write_text(yaml.safe_dump(doc, sort_keys=False))
    return dest


@contextlib.contextmanager
def running_cluster(layout_path: str | Path, attach: bool = False, log_dir: str | Path | None = None,
                    note: Callable[[str], None] | None = None) -> Iterator[tuple[Layout, Path]]:
    """Yields (layout, the layout file actually served). attach: the cluster is already up at the layout's
    addresses; otherwise it is started on free ports with the launcher (`tandem up`'s code) and stopped after."""
    from services.cluster.launcher import Cluster, check_devices, plan

    say = note or (lambda _m: None)
    if attach:
        yield load_layout(layout_path), Path(layout_path)
        return
    tmp = Path(tempfile.mkdtemp(prefix="tandem-bench-"))
    path = with_free_ports(layout_path, tmp / Path(layout_path).name)
    lay = load_layout(path)
    specs = plan(lay, str(path))
    check_devices(lay)
    cluster = Cluster(specs, log_dir or tmp / "logs")
    workers = [s.name for s in specs if s.name != "gateway"]
    try:
        t0 = time.perf_counter()
        say(f"starting {len(specs)} processes (logs in {cluster.log_dir})")
        cluster.start(workers)
        cluster.wait_healthy(workers, 300.0)
        cluster.start(["gateway"])
        cluster.wait_healthy(["gateway"], 120.0)
        say(f"cluster up in {time.perf_counter() - t0:.1f} s: gateway gRPC {lay.gateway.grpc}, HTTP {lay.gateway.http}")
        yield lay, path
    finally:
        cluster.stop()


def scaled_workload(trace: str, rate: float | None, duration: float | None, seed: int, scaling: Scaling) -> Workload:
    w = make_workload(trace, rate=rate, duration_s=duration, seed=seed)
    return scale_workload(w, scaling.prompt_scale, scaling.output_scale, scaling.max_prompt, scaling.max_output,
                          scaling.min_prompt, scaling.min_output)


def warm_up(gateway: str, n: int = 2) -> None:
    """A couple of requests so every process has run once (first-call costs stay out of the measurement)."""
    from services.bench.load import prompt_ids

    for i in range(n):
        stream_one(gateway, prompt_ids(16, 1000 + i), 4, f"warmup-{i}")


def bench(lay: Layout, w: Workload, progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Replay `w` through the running cluster of `lay`; the measured result dict."""
    import os

    warm_up(lay.gateway.grpc)
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    records = replay(lay.gateway.grpc, w, progress)
    res = measured_result(records, slo=lay.slo.to_slo())
    res["wall_s"] = time.perf_counter() - t0
    res["loadavg_before"] = [round(x, 2) for x in load_before]
    res["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    return res


def capacity(lay: Layout, w: Workload, seconds: float, concurrency: int | None = None) -> dict[str, Any]:
    """Saturated throughput of the running cluster, closed loop: `concurrency` clients (default: every decode
    and mixed worker's max_batch, summed: a full batch everywhere) each send `w`'s next request as soon as their
    last one finished. The first wave (every client's first request) ramps up: all of it queues for prefill at
    once, and on a layout with one prefill worker that alone can take many seconds. The window of `seconds`
    opens once every first-wave request has its first token out (`ramp_s`, at least seconds / 5 in) and the
    loop runs until it closes; the rate counts the completions inside it (the in-flight rest finish after)."""
    import threading

    import grpc

    from services.bench.load import prompt_ids

    if concurrency is None:
        concurrency = sum(p.count * (p.batching or lay.batching).max_batch
                          for role in ("decode", "mixed") for p in lay.pools_of(role))
    concurrency = max(1, concurrency)
    ch = grpc.insecure_channel(lay.gateway.grpc, options=[("grpc.max_concurrent_streams", max(256, concurrency))])
    lock, nxt, finish, failed = threading.Lock(), [0], [], [0]
    first: list[float] = []  # when each first-wave request's first token came out (or it failed)
    ramp = [float("inf")]  # the window's start, once the whole first wave has its first token
    t0 = time.perf_counter()

    def ramped(at: float) -> None:  # (under lock) one more first-wave request is past its prefill
        first.append(at)
        if len(first) == concurrency:
            ramp[0] = max(max(first), seconds / 5)

    def client() -> None:
        while time.perf_counter() - t0 < ramp[0] + seconds:
            with lock:
                k = nxt[0]
                nxt[0] += 1
            i = k % len(w)
            sent = time.perf_counter() - t0
            try:
                r = stream_one(lay.gateway.grpc, prompt_ids(int(w.prompt[i]), i), int(w.output[i]), f"cap-{i}", ch)
            except Exception:  # noqa: BLE001 - a refused or failed request counts, whatever the error
                with lock:
                    failed[0] += 1
                    if k < concurrency:
                        ramped(time.perf_counter() - t0)
                continue
            with lock:
                finish.append(time.perf_counter() - t0)
                if k < concurrency:
                    ramped(sent + r["ttft_s"])

    threads = [threading.Thread(target=client, daemon=True) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ch.close()
    start = ramp[0]
    window = [f for f in finish if start <= f <= start + seconds]
    return {"concurrency": concurrency, "seconds": seconds, "ramp_s": start, "wall_s": time.perf_counter() - t0,
            "sent": nxt[0], "completed": len(finish), "in_window": len(window), "failed": failed[0],
            "capacity_rps": len(window) / seconds if window else float("nan"),
            "prompt_tokens_mean": float(w.prompt.mean()), "output_tokens_mean": float(w.output.mean())}


def meta(layout: str | Path, trace: str, rate: float | None, duration: float | None, seed: int, scaling: Scaling,
         w: Workload, trace_csv: Path) -> dict[str, Any]:
    return {"layout": str(layout), "trace": trace, "rate": rate, "duration": duration, "seed": seed,
            "scaling": asdict(scaling), "workload_csv": str(trace_csv), "requests": len(w),
            "prompt_tokens_mean": float(w.prompt.mean()) if len(w) else 0.0,
            "output_tokens_mean": float(w.output.mean()) if len(w) else 0.0}


def run_bench_cluster(layout: str | Path, trace: str, rate: float | None, duration: float | None, seed: int,
                      scaling: Scaling, out: Path | None, attach: bool = False,
                      progress: Callable[[int], None] | None = None,
                      note: Callable[[str], None] | None = None) -> tuple[dict[str, Any], Workload]:
    w = scaled_workload(trace, rate, duration, seed, scaling)
    trace_csv = (out.with_suffix(".trace.csv") if out is not None
                 else Path(tempfile.mkdtemp(prefix="tandem-trace-")) / "workload.csv")
    write_trace(w, trace_csv)
    with running_cluster(layout, attach, note=note) as (lay, _path):
        res = bench(lay, w, progress)
    return {**meta(layout, trace, rate, duration, seed, scaling, w, trace_csv), **res}, w
