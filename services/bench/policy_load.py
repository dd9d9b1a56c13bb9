"""Throughput of the real Policy gRPC server under 1..N concurrent clients (`tandem bench policy --server`).

The server runs in this process exactly as `serve()` starts it (micro-batching window, max batch); the
clients run in a separate process (threads, one blocking `Act` at a time each, closed loop), so that their
Python work does not share the server's interpreter lock. Every response reports the size of the batch it
was denoised in; we report chunks/s, executed actions/s, latency and the batch sizes formed.
"""

from __future__ import annotations

import multiprocessing as mp
import threading
import time

import numpy as np


def _client_process(address: str, clients: int, seconds: float, obs: list[list[float]], out: mp.Queue) -> None:
    import grpc

    from services.rpc.tandem.v1 import policy_pb2, policy_pb2_grpc

    records: list[tuple[float, float, int]] = []  # (end time, latency, batch size)
    lock = threading.Lock()
    start = threading.Barrier(clients)

    def worker(i: int) -> None:
        with grpc.insecure_channel(address) as ch:
            stub = policy_pb2_grpc.PolicyStub(ch)
            stub.Describe(policy_pb2.DescribeRequest(), timeout=30)
            start.wait()
            t_end, n = time.perf_counter() + seconds, 0
            while time.perf_counter() < t_end:
                t0 = time.perf_counter()
                r = stub.Act(policy_pb2.ActRequest(observation=obs[(i + n) % len(obs)], seed=1000 * i + n), timeout=120)
                t1 = time.perf_counter()
                with lock:
                    records.append((t1, t1 - t0, r.batch_size))
                n += 1

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out.put({"records": records, "wall": time.perf_counter() - t0})


def measure(address: str, clients: int, seconds: float, obs: np.ndarray) -> dict:
    """Closed-loop load from `clients` concurrent callers for about `seconds`; one row of the table."""
    ctx = mp.get_context("spawn")
    q: mp.Queue = ctx.Queue()
    proc = ctx.Process(target=_client_process,
                       args=(address, clients, seconds, [o.reshape(-1).tolist() for o in obs], q))
    proc.start()
    res = q.get(timeout=seconds + 600)
    proc.join(timeout=30)
    rec = np.array(res["records"], float).reshape(-1, 3)
    lat, batch = rec[:, 1], rec[:, 2].astype(int)
    span = rec[:, 0].max() - rec[:, 0].min() if len(rec) > 1 else float("nan")
    # batches formed: a response from a batch of b stands for 1/b of that pass
    passes = float((1.0 / batch).sum())
    return {"clients": clients, "requests": int(len(rec)), "seconds": round(float(res["wall"]), 2),
            "chunks_per_s": float((len(rec) - 1) / span) if len(rec) > 1 else 0.0,
            "latency_p50_ms": float(np.median(lat) * 1e3), "latency_p95_ms": float(np.quantile(lat, 0.95) * 1e3),
            "mean_batch_per_request": float(batch.mean()), "mean_batch_per_pass": float(len(rec) / passes),
            "max_batch": int(batch.max()),
            "batch_histogram": {str(b): int(c) for b, c in zip(*np.unique(batch, return_counts=True), strict=True)}}


def run(checkpoint: str | None, clients: list[int], seconds: float, *, sampler: str = "ddpm100",
        cache: str = "bac", budget: int = 10, max_batch: int = 32, window_ms: float = 3.0) -> dict:
    """Start the real server, then load it with each client count in turn."""
    from services.bench import policy_evaluate as ev
    from services.policy.sampler import N_ACTION_STEPS
    from services.policy.server import serve

    srv = serve(0, checkpoint, host="127.0.0.1", sampler=sampler, cache=cache, budget=budget,
                max_batch=max_batch, window_ms=window_ms, block=False)
    try:
        obs = ev.eval_obs(64, 99)
        direct = {}  # the same engine called in-process: what one denoising pass costs at these batch sizes
        for b in sorted({1, *(min(c, max_batch) for c in clients)}):
            ts = []
            for r in range(5):
                t0 = time.perf_counter()
                srv.batcher.engine.act(obs[:b], list(range(r * b, r * b + b)))
                ts.append(time.perf_counter() - t0)
            direct[str(b)] = float(np.median(ts) * 1e3)
        rows = []
        for c in clients:
            row = measure(srv.address, c, seconds, obs)
            row["actions_per_s"] = row["chunks_per_s"] * N_ACTION_STEPS
            rows.append(row)
    finally:
        srv.stop()
    return {"sampler": sampler, "cache": cache, "budget": budget, "max_batch": max_batch, "window_ms": window_ms,
            "n_action_steps": N_ACTION_STEPS, "direct_pass_ms": direct, "rows": rows}
