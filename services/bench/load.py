"""Drive a running cluster through its gateway (gRPC Generation): one request, or an open-loop trace replay.

Every token's arrival is stamped on the client (time.perf_counter) and reduced with the simulator's own metric
code (services.contracts.metrics), so a measurement and a prediction carry the same keys.
"""

from __future__ import annotations

import csv
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from services.contracts.metrics import SLO, RequestRecord, request_samples, summarize
from services.rpc.tandem.v1 import generation_pb2 as gpb
from services.rpc.tandem.v1 import generation_pb2_grpc as gpb_grpc
from sim.trace import Workload

# Token ids every test model has (the tiny checkpoints have 256); the content does not change the cost.
ID_LO, ID_HI = 3, 250


def prompt_ids(n: int, salt: int) -> list[int]:
    return [ID_LO + (salt * 31 + 7 * k) % (ID_HI - ID_LO) for k in range(n)]


def _request(ids: list[int], max_tokens: int) -> gpb.GenerateRequest:
    return gpb.GenerateRequest(token_ids=gpb.TokenIds(ids=ids), timeout_s=600.0,
                               sampling=gpb.SamplingOptions(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))


def stream_one(gateway: str, ids: list[int], max_tokens: int, rid: str, ch: grpc.Channel | None = None) -> dict[str, Any]:
    """One streamed request: client TTFT and gaps, plus the gateway's timings split."""
    own = ch is None
    ch = ch or grpc.insecure_channel(gateway)
    try:
        t0 = time.perf_counter()
        times, last = [], None
        for msg in gpb_grpc.GenerationStub(ch).Generate(_request(ids, max_tokens), timeout=600,
                                                         metadata=(("x-request-id", rid),)):
            now = time.perf_counter()
            times += [now] * len(msg.token_ids)
            last = msg
    finally:
        if own:
            ch.close()
    t = last.timings
    return {"ttft_s": times[0] - t0, "gaps": list(np.diff(times)), "e2e_s": times[-1] - t0,
            "queue_s": t.queue_s, "prefill_s": t.prefill_s, "kv_transfer_s": t.kv_transfer_s,
            "gateway_s": t.gateway_s, "workers": list(last.workers)}


def scale_workload(w: Workload, prompt_scale: float, output_scale: float, max_prompt: int, max_output: int,
                   min_prompt: int = 4, min_output: int = 2) -> Workload:
    """Lengths scaled to what this machine serves: round(x · scale), clipped to [min, max]; arrivals unchanged."""
    p = np.clip(np.rint(w.prompt * prompt_scale), min_prompt, max_prompt).astype(np.int64)
    o = np.clip(np.rint(w.output * output_scale), min_output, max_output).astype(np.int64)
    return Workload(w.arrival_s.copy(), p, o, name=f"{w.name}-scaled")


def write_trace(w: Workload, path: Path) -> None:
    """The workload as a trace CSV (`tandem sim run --trace PATH` replays these exact arrivals and sizes)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["TIMESTAMP", "ContextTokens", "GeneratedTokens"])
        for t, p, o in zip(w.arrival_s, w.prompt, w.output, strict=True):
            out.writerow([f"{t:.6f}", int(p), int(o)])


def replay(gateway: str, w: Workload, progress: Callable[[int], None] | None = None,
           max_streams: int = 256) -> list[RequestRecord]:
    """Open loop: request i is sent at its arrival time whether or not earlier ones finished; a request the
    cluster fails counts as dropped. Arrival is the scheduled time (a late client counts as queueing)."""
    ch = grpc.insecure_channel(gateway, options=[("grpc.max_concurrent_streams", max_streams)])
    records = [RequestRecord(f"r{i}", float(w.arrival_s[i]), int(w.prompt[i])) for i in range(len(w))]
    done = [0]
    lock = threading.Lock()
    t0 = time.perf_counter() + 0.2

    def one(i: int) -> None:
        rec = records[i]
        delay = t0 + rec.arrival_s - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        try:
            for msg in gpb_grpc.GenerationStub(ch).Generate(_request(prompt_ids(rec.prompt_tokens, i), int(w.output[i])),
                                                             timeout=600, metadata=(("x-request-id", rec.request_id),)):
                now = time.perf_counter() - t0
                rec.token_times_s.extend([now] * len(msg.token_ids))
            rec.finish_s = rec.token_times_s[-1] if rec.token_times_s else None
        except grpc.RpcError:
            rec.dropped = True
        with lock:
            done[0] += 1
            if progress:
                progress(done[0])

    with ThreadPoolExecutor(max_workers=min(max_streams, max(1, len(w)))) as pool:
        list(pool.map(one, range(len(w))))
    ch.close()
    return records


def measured_result(records: list[RequestRecord], slo: SLO | None = None) -> dict[str, Any]:
    """summarize() of the records (the simulator's keys) plus `samples` and `entered`."""
    res: dict[str, Any] = summarize(records, slo=slo)
    done = [r for r in records if not r.dropped and r.token_times_s]
    tbt = [float(np.mean(r.tbt_gaps_s)) if r.output_tokens > 1 else float("nan") for r in done]
    for k, vals in (("ttft", [r.ttft_s for r in done]), ("tbt", tbt), ("e2e", [r.e2e_s for r in done])):
        v = np.asarray(vals, dtype=float)
        v = v[np.isfinite(v)]
        res[f"{k}_mean_s"] = float(v.mean()) if v.size else float("nan")
    res["entered"] = len(records)
    res["samples"] = request_samples(np.array([r.ttft_s for r in done]), np.array(tbt), np.array([r.e2e_s for r in done]))
    return res
