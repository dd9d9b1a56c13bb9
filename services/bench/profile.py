"""`tandem profile`: measure the real engine, batcher, scheduler and KV path on this machine and write the
simulator's performance table (sim/perf.py reads it through `sim.perf_model: PATH`).

Rows (CSV or JSON, one `kind` each; times in ms like splitwise_perf_model.csv):
- prompt:   prompt_size x batch_size -> prompt_time   (PrefillBatcher: forward pass + first sample)
- token:    batch_size, token_size (context per request) -> token_time   (one FusionScheduler.step())
- kv:       kv_bytes -> kv_time   (a whole push over gRPC to a decode worker process: KVTransfer.Push)
- overhead: name -> value   (seconds, or ratios; measured through a running cluster's gateway at light load;
              step_jitter_q<per mille>: quantiles of the in-cluster token gap over its request's median;
              host_*, decode_join_stall_s, prefill_ratio@N: what the cluster's processes on one host do to one
              another, from host_interference)
"""

from __future__ import annotations

import csv
import json
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

COLUMNS = ["model", "hardware", "kind", "prompt_size", "batch_size", "token_size", "prompt_time", "token_time",
           "kv_bytes", "kv_time", "name", "value"]
Progress = Callable[[str], None]


@dataclass(slots=True)
class Plan:
    """What to measure. `quick()` is the demo's: about 20 s of measurements on a 2-core CPU."""

    prompt_sizes: list[int] = field(default_factory=lambda: [8, 16, 32, 64, 128, 256])
    prompt_batches: list[int] = field(default_factory=lambda: [1, 2, 4])
    decode_batches: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16])
    contexts: list[int] = field(default_factory=lambda: [16, 128, 384])
    kv_tokens: list[int] = field(default_factory=lambda: [16, 64, 256, 1024])
    repeats: int = 3
    steps: int = 4
    overhead_requests: int = 6
    # in-cluster decode steps at these batch sizes (b requests per decode batch at once through the gateway); each
    # must be one of decode_batches and at most the layout's max_batch. Empty: only the one-at-a-time ratio.
    cluster_batches: list[int] = field(default_factory=lambda: [1, 4, 16])
    cluster_output: int = 96
    # the host probe (host_interference): prompts of these sizes prefill beside 1..k decode streams in the
    # running cluster (the trace's scaled prompts on this CPU are mostly 100-256 tokens); `host_rounds` prompts
    # per phase, each followed by a quiet spell as long as its prefill; streams of `host_output` tokens.
    # Empty sizes: no host rows.
    host_prompts: list[int] = field(default_factory=lambda: [128, 256])
    host_rounds: int = 8
    host_output: int = 120
    host_streams: int = 8  # a last phase with this many streams over every decode batch (0: none)
    # prefill_ratio@N (prefill_ratios): prompts of these sizes alone through the cluster, each paired with the same
    # prompt through the engine alone in this process, `ratio_rounds` times round robin (the trace's scaled prompts
    # on this CPU are 4-256 tokens). Empty: no such rows.
    ratio_prompts: list[int] = field(default_factory=lambda: [16, 32, 64, 128, 256])
    ratio_rounds: int = 4

    @classmethod
    def quick(cls) -> Plan:
        return cls(prompt_sizes=[8, 48, 192], prompt_batches=[1, 2], decode_batches=[1, 4, 16],
                   contexts=[16, 256], kv_tokens=[16, 1024], repeats=2, steps=3, overhead_requests=4,
                   host_rounds=4, host_output=70, host_streams=0, ratio_prompts=[16, 64, 192], ratio_rounds=2,
                   cluster_batches=[])

    @classmethod
    def gpu(cls, quick: bool = False) -> Plan:
        """A GPU's range: prompts and contexts up to 4096 tokens, decode batches up to 32 (a 1B model's cells
        take milliseconds, so more points cost little); `quick` keeps every other point."""
        plan = cls(prompt_sizes=[32, 128, 512, 1024, 2048, 4096], prompt_batches=[1, 2, 4],
                   decode_batches=[1, 2, 4, 8, 16, 32], contexts=[128, 1024, 4096], kv_tokens=[64, 512, 2048, 4096],
                   repeats=5, steps=10, overhead_requests=10, cluster_batches=[1, 4, 16, 32], cluster_output=64,
                   host_prompts=[1024, 2048], host_rounds=8, host_output=1500, host_streams=16,
                   ratio_prompts=[128, 512, 1024, 2048, 4096], ratio_rounds=4)
        if quick:
            plan.prompt_sizes, plan.decode_batches, plan.contexts = [32, 512, 4096], [1, 4, 16, 32], [128, 4096]
            plan.ratio_prompts, plan.ratio_rounds = [512, 4096], 2
            plan.cluster_batches = [1, 4, 32]
            plan.kv_tokens, plan.repeats, plan.steps, plan.overhead_requests = [64, 4096], 3, 5, 6
        return plan

    @classmethod
    def for_device(cls, device_type: str, quick: bool = False) -> Plan:
        """The plan for an engine on `device_type` ('cpu' or 'cuda')."""
        if device_type == "cuda":
            return cls.gpu(quick)
        return cls.quick() if quick else cls()

    def units(self) -> int:
        """Progress units: one per measured cell."""
        return (len(self.prompt_sizes) * len(self.prompt_batches) + len(self.decode_batches) * len(self.contexts)
                + len(self.kv_tokens) + 1)


def _row(model: str, hardware: str, kind: str, **kw: Any) -> dict[str, Any]:
    row = dict.fromkeys(COLUMNS, "")
    row.update(model=model, hardware=hardware, kind=kind, **kw)
    return row


# -- the engine: prefill through the batcher, decode through the scheduler -------------------------------------
class EnginePrefill:
    """The worker's own PrefillBatcher in this process, on jobs that stay here (no KV push): `run(n, b)` prefills
    b prompts of n tokens as the batcher's loop runs a batch, without the queue wait, and returns its seconds."""

    def __init__(self, engine: Any, max_batch: int) -> None:
        from services.engine.sampling import SamplingParams
        from services.workers.prefill import PrefillBatcher

        self.vocab = engine.cfg.vocab_size
        self.batcher = PrefillBatcher(engine, max_batch_tokens=1 << 30, max_batch=max_batch, overlap=False)
        self.params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)

    def __call__(self, n: int, b: int = 1) -> float:
        from services.engine.sampling import Sampler
        from services.workers.prefill import PrefillJob

        jobs = [PrefillJob(f"p{n}-{b}-{i}", [(7 * i + 13 * k) % (self.vocab - 4) + 3 for k in range(n)], self.params,
                           None, sampler=Sampler(self.params)) for i in range(b)]
        self.batcher._run(jobs)
        return jobs[0].future.result(60).timings.prefill_s

    def stop(self) -> None:
        self.batcher.stop()


def prefill_rows(engine: Any, plan: Plan, tick: Progress) -> list[tuple[int, int, float]]:
    """(prompt_size, batch_size, seconds): the worker's PrefillBatcher on jobs that stay in-process."""
    run = EnginePrefill(engine, max(plan.prompt_batches))
    out = []
    try:
        run(plan.prompt_sizes[0], 1)  # warm-up
        cells = [(n, b) for n in plan.prompt_sizes for b in plan.prompt_batches if n < engine.cfg.max_seq_len]
        times: dict[tuple[int, int], list[float]] = {c: [] for c in cells}
        # round robin over the cells: a drift in the machine's load (shared cores) spreads over every cell
        # instead of bending one end of the curve
        for r in range(plan.repeats + 1):  # round 0 warms each shape (first-call costs), then is dropped
            for n, b in cells:
                t = run(n, b)
                if r:
                    times[(n, b)].append(t)
                if r == plan.repeats:
                    tick(f"prefill {n} x {b}")
        out = [(n, b, statistics.median(times[(n, b)])) for n, b in cells]
    finally:
        run.stop()
    return out


def decode_rows(engine: Any, plan: Plan, tick: Progress, sequential: bool | None = None) -> list[tuple[int, int, float]]:
    """(batch_size, context per request, seconds per step): FusionScheduler.step() over b live requests.

    On the CPU the cells are stepped round robin, so a drift in the machine's load spreads over all of them. On
    CUDA each cell runs its steps back to back after a warm step: the engine keeps one CUDA graph per batch
    bucket over the KV buffer it last saw, so alternating between cells (each with its own buffer) would time a
    graph capture at every step. `sequential` forces either way (None: back to back on CUDA)."""
    import torch

    from services.batching.scheduler import DecodeRequest, FusionScheduler
    from services.engine.sampling import SamplingParams

    cfg = engine.cfg
    params = SamplingParams(max_tokens=plan.steps + 8, temperature=0.0, ignore_eos=True)
    on_gpu = engine.device.type == "cuda" if sequential is None else sequential

    def cell(b: int, ctx: int) -> Any:
        sched = FusionScheduler(engine, "fusion", max_batch=b, kv_budget_bytes=None)
        shape = (ctx, cfg.n_kv_heads, cfg.head_dim)
        for i in range(b):  # made where the engine runs: a GPU's cells hold gigabytes of KV
            kv = [(torch.randn(shape, dtype=engine.dtype, device=engine.device) * 0.1,
                   torch.randn(shape, dtype=engine.dtype, device=engine.device) * 0.1) for _ in range(cfg.n_layers)]
            sched.submit(DecodeRequest(f"d{i}", kv, 5, params, emit=lambda tok, reason: None))
        sched.step()  # admits every request (installs their KV) and runs the first step
        return sched

    def step(sched: Any) -> float:
        t0 = time.perf_counter()
        sched.step()
        return time.perf_counter() - t0

    shapes = [(b, ctx) for ctx in plan.contexts if ctx + plan.steps + 8 < cfg.max_seq_len for b in plan.decode_batches]
    if on_gpu:
        out = []
        for b, ctx in shapes:
            sched = cell(b, ctx)
            try:
                step(sched)  # warm: this cell's buffer gets its graph
                out.append((b, ctx, statistics.median(step(sched) for _ in range(plan.steps))))
            finally:
                sched.stop()
            tick(f"decode batch {b} context {ctx}")
        return out
    cells = {(b, ctx): (cell(b, ctx), []) for b, ctx in shapes}
    for r in range(plan.steps):  # round robin, as for prefill
        for (b, ctx), (sched, times) in cells.items():
            times.append(step(sched))
            if r == plan.steps - 1:
                sched.stop()
                tick(f"decode batch {b} context {ctx}")
    return [(b, ctx, statistics.median(times)) for (b, ctx), (_, times) in cells.items()]


def side_by_side(engine: Any, plan: Plan, prompt: int = 64, batch: int = 4, ctx: int = 64) -> dict[str, float]:
    """A mixed worker runs its batcher and its scheduler on two threads of one process: each phase's slowdown
    while the other runs (prefill of `prompt` tokens beside a decode batch of `batch` x `ctx`), alone first."""
    import threading

    import torch

    from services.batching.scheduler import DecodeRequest, FusionScheduler
    from services.engine.sampling import Sampler, SamplingParams
    from services.workers.prefill import PrefillBatcher, PrefillJob

    cfg = engine.cfg
    params = SamplingParams(max_tokens=100000, temperature=0.0, ignore_eos=True)
    sched = FusionScheduler(engine, "fusion", max_batch=batch, kv_budget_bytes=None)
    shape = (ctx, cfg.n_kv_heads, cfg.head_dim)
    for i in range(batch):
        kv = [(torch.randn(shape) * 0.1, torch.randn(shape) * 0.1) for _ in range(cfg.n_layers)]
        sched.submit(DecodeRequest(f"s{i}", [(k.to(engine.dtype), v.to(engine.dtype)) for k, v in kv], 5, params,
                                   emit=lambda tok, reason: None))
    sched.step()
    batcher = PrefillBatcher(engine, max_batch_tokens=1 << 30, max_batch=1, overlap=False)
    p1 = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)

    def prefill() -> float:
        job = PrefillJob("side", [3 + k % 200 for k in range(min(prompt, cfg.max_seq_len - 1))], p1, None,
                         sampler=Sampler(p1))
        batcher._run([job])
        return job.future.result(60).timings.prefill_s

    def step() -> float:
        t0 = time.perf_counter()
        sched.step()
        return time.perf_counter() - t0

    try:
        prefill()
        alone_p = statistics.median(prefill() for _ in range(plan.repeats))
        alone_d = statistics.median(step() for _ in range(max(plan.steps, 3)))
        beside: list[float] = []
        stop = threading.Event()

        def loop() -> None:
            while not stop.is_set():
                beside.append(step())

        th = threading.Thread(target=loop, daemon=True)
        th.start()
        time.sleep(min(0.5, 2 * alone_d))
        during = [prefill() for _ in range(plan.repeats)]
        stop.set()
        th.join()
    finally:
        sched.stop()
        batcher.stop()
    return {"mixed_prefill_slowdown": max(1.0, statistics.median(during) / alone_p),
            "mixed_decode_slowdown": max(1.0, statistics.median(beside) / alone_d) if beside else 1.0}


# -- the KV path: a real push to a decode worker process ----------------------------------------------------------
def kv_rows(engine: Any, plan: Plan, tick: Progress) -> list[tuple[int, float]]:
    """(bytes, seconds) of whole pushes (header + every layer, crc32 and validation) to a decode worker process
    whose model has this engine's KV shape (small random weights: it loads in a second)."""
    import torch

    from services.bench.kv import _spawn_worker, _stop
    from services.grpcutil import channel, wait_healthy
    from services.kv.proto import encode_wire
    from services.kv.sender import PUSH
    from services.kv.wire import DEFAULT_CHUNK, KVSpec, dtype_name
    from services.rpc.tandem.v1 import worker_pb2 as pb
    from services.rpc.tandem.v1 import worker_pb2_grpc as rpc
    from services.workers.modelspec import load_model, random_spec

    cfg = engine.cfg
    if not plan.kv_tokens:
        return []
    # the receiver's KV dtype is the engine's (bf16 on a GPU), whatever device it lands on
    spec_str = random_spec(vocab_size=256, dim=64, n_layers=cfg.n_layers, n_heads=cfg.n_kv_heads,
                           n_kv_heads=cfg.n_kv_heads, head_dim=cfg.head_dim, hidden_dim=64,
                           max_seq_len=max(plan.kv_tokens) + 8, dtype=dtype_name(engine.dtype))
    receiver_fp = load_model(spec_str).fingerprint
    proc, addr = _spawn_worker("decode", spec_str, ["--kv-budget-mb", "512"])
    out = []
    try:
        wait_healthy(addr, 120)
        with channel(addr) as ch:
            stub = rpc.KVTransferStub(ch)
            push = ch.stream_unary(PUSH, request_serializer=None, response_deserializer=pb.KVReceipt.FromString)
            for n in [plan.kv_tokens[0], *plan.kv_tokens]:  # the first push warms the channel up
                spec = KVSpec(receiver_fp, cfg.n_layers, dtype_name(engine.dtype), n, cfg.n_kv_heads, cfg.head_dim)
                layers = [(torch.randn(spec.shape).to(engine.dtype), torch.randn(spec.shape).to(engine.dtype))
                          for _ in range(cfg.n_layers)]
                times = []
                for i in range(plan.repeats):
                    t0 = time.perf_counter()
                    receipt = push(encode_wire(spec, f"kv-{n}-{i}", layers, DEFAULT_CHUNK), timeout=120)
                    times.append(time.perf_counter() - t0)
                    stub.Release(pb.KVReleaseRequest(handle=receipt.handle), timeout=10)
                out.append((spec.nbytes, statistics.median(times)))
            out = out[1:]
        for _ in out:
            tick("kv push")
    finally:
        _stop([proc])
    return out


def fit_linear(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares intercept and slope (both clipped at 0)."""
    slope, icpt = np.polyfit(np.asarray(xs, float), np.asarray(ys, float), 1)
    return max(float(icpt), 0.0), max(float(slope), 0.0)


# -- overheads through a running cluster ----------------------------------------------------------------------------
PROBE_PROMPT = 32  # the overhead probe's prompt (tokens): its prefill_ratio is the ratio at this size
JITTER_LEVELS = (0, 50, 100, 150, 200, 250, 300, 350, 400, 450, 500, 550, 600, 650, 700, 750, 800, 850, 900, 950,
                 975, 990, 1000)  # per mille: overhead rows step_jitter_q<level> (sim/perf.py reads them back)


def jitter_quantiles(gap_lists: list[list[float]]) -> dict[str, float]:
    """The in-cluster decode step's spread: every token gap over its own request's median gap, pooled, as the
    quantiles the simulator draws each decode iteration's multiplier from (median 1; the level is
    decode_step_ratio's)."""
    pooled = [g / m for gaps in gap_lists if len(gaps) > 2 and (m := float(np.median(gaps))) > 0 for g in gaps]
    if len(pooled) < 20:
        return {}
    q = np.quantile(np.asarray(pooled, float), [lv / 1000 for lv in JITTER_LEVELS])
    return {f"step_jitter_q{lv:04d}": float(v) for lv, v in zip(JITTER_LEVELS, q, strict=True)}


def overhead_values(gateway: str, step_s: Callable[[int, int], float], prefill_s: Callable[[int], float], n: int,
                    prompt: int = PROBE_PROMPT, output: int = 40, batch: int = 4) -> dict[str, float]:
    """Requests through the gateway (gRPC): what the engine profile cannot see. `n` one at a time, then one
    group of `batch` sent together.

    request_overhead_s: client-side TTFT minus the worker's own queue + prefill + KV transfer (tokenize,
    route, RPC hops); decode_join_s: the first decode gap minus one profiled step (Decode call, KV claim,
    admission); decode_step_ratio, prefill_ratio: in-cluster times over the engine-alone profile (the other
    processes' threads and the gRPC streams share the cores), medians over the lone requests; step_jitter_q*: the spread
    of the in-cluster token gaps (jitter_quantiles) from the lone requests' gaps and the group's gaps once all
    of it decodes."""
    from concurrent.futures import ThreadPoolExecutor

    from services.bench.load import prompt_ids, stream_one

    rows = []
    for i in range(n + 1):  # the first request warms every process up
        r = stream_one(gateway, prompt_ids(prompt, i), output, f"profile-{i}")
        if i:
            rows.append(r)
    with ThreadPoolExecutor(batch) as pool:
        t0 = time.perf_counter()
        group = list(pool.map(lambda j: stream_one(gateway, prompt_ids(prompt, n + 1 + j), output,
                                                   f"profile-b{j}"), range(batch)))
    ovh = [r["ttft_s"] - r["queue_s"] - r["prefill_s"] - r["kv_transfer_s"] for r in rows]
    join = [r["gaps"][0] - step_s(1, prompt + 1) for r in rows if r["gaps"]]
    ratio = [float(np.median(r["gaps"][1:])) / step_s(1, prompt + output // 2) for r in rows if len(r["gaps"]) > 1]
    pre = [r["prefill_s"] / prefill_s(prompt) for r in rows]
    # the group decodes together once its last member's first token is out (and that member joined: 2 gaps on)
    lone = [r["gaps"][1:] for r in rows]
    together = t0 + max(r["ttft_s"] for r in group)
    batched = []
    for r in group:
        at = t0 + r["ttft_s"] + np.cumsum(r["gaps"])  # when each gap ended
        batched.append([g for g, e in zip(r["gaps"], at, strict=True) if e > together][2:])
    return {"request_overhead_s": max(0.0, statistics.median(ovh)), "prefill_ratio": statistics.median(pre),
            "decode_join_s": max(0.0, statistics.median(join)) if join else 0.0,
            "decode_step_ratio": statistics.median(ratio) if ratio else 1.0, **jitter_quantiles(lone + batched)}


def batch_step_ratios(gateway: str, step_s: Callable[[int, int], float], batches: list[int], output: int,
                      prompt: int = 32, decode_workers: int = 1, detail: dict[int, list[list[str]]] | None = None,
                      ) -> dict[str, float]:
    """The decode step in the cluster at batch b over the engine-alone step: b requests per decode batch (b times
    `decode_workers`, which the gateway's JSQ spreads evenly) sent together through the gateway, the mean token gap
    over the middle half of their streams (all decoding; median over streams) over the profiled step at batch b.
    Per-token work outside the engine (each stream's gRPC messages in the worker and the gateway, in Python
    threads) grows with b, so one ratio measured one request at a time misses it.
    Keys `decode_step_ratio@B` (sim/perf.py interpolates them over the batch size). `detail` receives each
    stream's workers per b."""
    from concurrent.futures import ThreadPoolExecutor

    import grpc

    from services.bench.load import prompt_ids, stream_one

    out: dict[str, float] = {}
    ch = grpc.insecure_channel(gateway, options=[("grpc.max_concurrent_streams", 1024)])
    try:
        for b in batches:
            n = b * max(1, decode_workers)
            with ThreadPoolExecutor(max_workers=n) as pool:  # n streams at once: b on each decode batch
                res = list(pool.map(lambda i, b=b: stream_one(gateway, prompt_ids(prompt, 500 + i), output,
                                                              f"batch-{b}-{i}", ch), range(n)))
            if detail is not None:
                detail[b] = [r["workers"] for r in res]
            lo, hi = output // 4, 3 * output // 4
            # per stream, the mean gap over the window (a message may carry several tokens: zero gaps)
            steps = [sum(r["gaps"][lo:hi]) / (hi - lo) for r in res if len(r["gaps"]) >= hi]
            if steps:
                out[f"decode_step_ratio@{b}"] = float(np.median(steps)) / step_s(b, prompt + output // 2)
    finally:
        ch.close()
    return out


def prefill_ratios(gateway: str, engine_prefill: Callable[[int], float], sizes: list[int], rounds: int,
                   detail: dict[str, Any] | None = None) -> dict[str, float]:
    """prefill_ratio@N: a prompt of N tokens alone through the cluster (the worker's own `prefill_s`; on a split
    layout it includes feeding the overlapped KV push) over the same prompt prefilled by the engine alone in this
    process right before it. The sizes go round robin, `rounds` times after a warm-up round that is dropped; the
    row is the median of the per-pair ratios, so a drift in the machine's speed falls on both halves of a ratio
    alike (a ratio over the engine table of minutes before carries whatever the machine did in between). On a
    CPU the pairs show a cost that barely grows with the prompt, hence a ratio that falls with its size; the
    simulator interpolates the rows over the batch's prompt tokens. `detail` receives the pairs per size."""
    from services.bench.load import prompt_ids, stream_one

    sizes = sorted({n for n in sizes if n > 0})
    pairs: dict[int, list[tuple[float, float]]] = {n: [] for n in sizes}
    for r in range(rounds + 1):
        for n in sizes:
            alone = engine_prefill(n)
            res = stream_one(gateway, prompt_ids(n, 700 + 10 * r + n), 2, f"ratio-{n}-{r}")
            if r:  # round 0 warms each size up on both sides (first-call costs)
                pairs[n].append((res["prefill_s"], alone))
    if detail is not None:
        detail.update(pairs=pairs)
    return {f"prefill_ratio@{n}": statistics.median(c / a for c, a in ps) for n, ps in pairs.items()
            if ps and all(a > 0 for _, a in ps)}


def _stream_live(ch: Any, ids: list[int], max_tokens: int, rid: str) -> tuple[Any, dict[str, Any]]:
    """One streamed request on its own thread; its token times (perf_counter) fill in as they come."""
    import threading

    from services.bench.load import _request
    from services.rpc.tandem.v1 import generation_pb2_grpc as gpb_grpc

    rec: dict[str, Any] = {"times": [], "workers": []}

    def run() -> None:
        for msg in gpb_grpc.GenerationStub(ch).Generate(_request(ids, max_tokens), timeout=600,
                                                         metadata=(("x-request-id", rid),)):
            rec["times"] += [time.perf_counter()] * len(msg.token_ids)
            rec["workers"] = list(msg.workers) or rec["workers"]

    th = threading.Thread(target=run, daemon=True)
    th.start()
    return th, rec


def _batches(live: list[tuple[Any, dict[str, Any]]]) -> int:
    """Distinct decode workers serving these streams (each stream's last named worker)."""
    return len({tuple(rec["workers"][-1:]) for _, rec in live})


def _overlap(a: float, b: float, windows: list[tuple[float, float]]) -> float:
    """The share of (a, b] covered by the (disjoint) windows."""
    return sum(max(0.0, min(b, w1) - max(a, w0)) for w0, w1 in windows) / (b - a) if b > a else 0.0


def host_interference(gateway: str, decode_workers: int, prompts: list[int], rounds: int, output: int,
                      prompt: int = 32, detail: dict[str, Any] | None = None,
                      prefill_s: Callable[[int], float] | None = None, streams: int = 0) -> dict[str, float]:
    """What the cluster's processes do to one another on a shared host (the local cluster: every worker, the
    gateway and this client on the same cores), measured through the gateway with the layout's own workers.

    Alone first: each prompt size prefilled twice with nothing else running (the worker's own prefill time).
    Then phases of s decoding streams (prompt 32, `output` tokens): s = 1 .. `decode_workers`, one stream per
    decode batch, and, when `streams` > `decode_workers`, s = `streams` spread over every batch. The streams are
    sent one after another, each once decoding (JSQ then puts the next on another batch); once all decode,
    `rounds` prompts (sizes cycling through `prompts`, output 2) one after another, each followed by a quiet spell
    as long as its prefill. Each prompt's prefill window is placed from its first token back over the unhidden
    KV transfer and its prefill time; a stream gap is *covered* when such windows cover half of it, *quiet* when
    none touches it, a *join* when a prompt's second token came out in it on the stream's own worker.

    prefill_ratio@N (with `prefill_s`, the profiled engine-alone prefill of N tokens): the alone prefill over it.
    host_prefill_slowdown@s: a prompt's prefill time while s streams decode on the host over its size's time
    alone (median over the phase). host_decode_slowdown@k (k > 1, one stream per batch): the median quiet gap
    with k decode batches over that with one. host_decode_slowdown_prefill@s: the median covered gap over the
    median quiet gap of the same phase (what a prefill beside them adds, with s streams decoding), and
    host_covered_q<per mille>@s the quantiles of those covered gaps over that median (a prefill stretches some gaps
    far more than the median says: the decode tail the simulator draws from).
    host_phase_batches@s: the decode batches phase s's streams ran on (the simulator reads the two beside-a-
    prefill rows among the phases with the host's running batch count: the busy processes share the cores).
    decode_join_stall_s: the median of (join gap - its phase's median quiet gap). A phase whose streams did not
    reach min(s, decode_workers) batches gives no rows. `detail` receives the raw gaps and ratios per phase."""
    import grpc

    from services.bench.load import prompt_ids, stream_one

    prompts = [n for n in prompts if n > 0]
    if not prompts or rounds < 1 or decode_workers < 1:
        return {}
    alone: dict[int, list[float]] = {n: [] for n in prompts}
    for i in range(2 * len(prompts) + 1):  # the first one warms the size up, then two of each
        n = prompts[i % len(prompts)]
        r = stream_one(gateway, prompt_ids(n, 900 + i), 2, f"host-alone-{i}")
        if i:
            alone[n].append(r["prefill_s"])
    alone_s = {n: statistics.median(v) for n, v in alone.items()}
    out: dict[str, float] = {}
    if prefill_s is not None:  # the in-cluster prefill at the trace's sizes over the engine-alone profile
        out.update({f"prefill_ratio@{n}": alone_s[n] / prefill_s(n) for n in prompts})
    phases: dict[int, dict[str, list[float]]] = {}
    skipped: dict[int, str] = {}
    plan = list(range(1, decode_workers + 1)) + ([streams] if streams > decode_workers else [])
    ch = grpc.insecure_channel(gateway, options=[("grpc.max_concurrent_streams", 256)])
    try:
        for s in plan:
            want = min(s, decode_workers)  # decode batches the s streams should spread over
            live: list[tuple[Any, dict[str, Any]]] = []
            deadline = time.perf_counter() + 120

            # one after another, each once decoding; a gateway's stale load view can stack two on one batch:
            # then more, at most s + decode_workers in all
            while (len(live) < s or _batches(live) < want) and len(live) < s + decode_workers:
                j = len(live)
                live.append(_stream_live(ch, prompt_ids(prompt, 950 + 40 * s + j), output, f"host-{s}-s{j}"))
                while any(len(rec["times"]) < 3 for _, rec in live) and time.perf_counter() < deadline:
                    time.sleep(0.005)  # (first token and two gaps out)
            windows: list[tuple[float, float]] = []
            ratios: list[float] = []
            joins: list[tuple[float, str]] = []  # (a prompt's second token: the step it joined, its decode worker)
            for i in range(rounds):
                if any(len(rec["times"]) > output - 8 for _, rec in live):
                    break  # a stream is about to end: its decode batch would shrink or go idle
                n = prompts[i % len(prompts)]
                t0 = time.perf_counter()
                r = stream_one(gateway, prompt_ids(n, 1000 + 100 * s + i), 2, f"host-{s}-p{i}")
                end = t0 + r["ttft_s"] - r["kv_transfer_s"]
                windows.append((end - r["prefill_s"], end))
                ratios.append(r["prefill_s"] / alone_s[n])
                if r["gaps"] and r["workers"]:
                    joins.append((t0 + r["ttft_s"] + r["gaps"][0], r["workers"][-1]))
                time.sleep(r["prefill_s"])  # a quiet spell: the same streams' gaps without a prefill beside them
            for th, _ in live:
                th.join(600)
            got = _batches(live)
            if got < want or not windows:  # JSQ stacked the streams on fewer batches, or they ended first
                skipped[s] = f"{got} decode batches for {len(live)} streams, {len(windows)} prompts"
                continue
            ph = phases[len(live)] = {"prefill_ratio": ratios, "covered": [], "quiet": [], "join": [],
                                      "batches": [got]}
            lo, hi = windows[0][0], windows[-1][1] + windows[-1][1] - windows[-1][0]
            for _, rec in live:
                times, at = rec["times"], rec["workers"][-1:]
                mine = [t for t, w in joins if [w] == at]
                for a, b in zip(times[2:], times[3:], strict=False):
                    if b <= a or b < lo or a > hi:
                        continue  # several tokens in one message, or outside the probed spell
                    if any(a + (b - a) / 2 < t <= b + (b - a) / 2 for t in mine):
                        ph["join"].append(b - a)  # the step a prompt joined this batch in (its token and ours)
                        continue
                    share = _overlap(a, b, windows)
                    if share >= 0.5:
                        ph["covered"].append(b - a)
                    elif share == 0.0:
                        ph["quiet"].append(b - a)
    finally:
        ch.close()
    if detail is not None:
        detail.update(alone=alone, phases=phases, skipped=skipped)
    quiet = {s: statistics.median(ph["quiet"]) for s, ph in phases.items() if len(ph["quiet"]) >= 5}
    for s, ph in phases.items():
        out[f"host_prefill_slowdown@{s}"] = max(1.0, statistics.median(ph["prefill_ratio"]))
        out[f"host_phase_batches@{s}"] = float(ph["batches"][0])
        if s not in quiet:
            continue
        if 1 < s <= decode_workers and ph["batches"] == [s] and 1 in quiet:  # one stream on each of s batches
            out[f"host_decode_slowdown@{s}"] = max(1.0, quiet[s] / quiet[1])
        if len(ph["covered"]) >= 5:
            out[f"host_decode_slowdown_prefill@{s}"] = max(1.0, statistics.median(ph["covered"]) / quiet[s])
            # ... and their spread: a prefill stretches some gaps far more than its median (the tail of TBT)
            q = np.quantile(np.array(ph["covered"]) / quiet[s], [lv / 1000 for lv in JITTER_LEVELS])
            out.update({f"host_covered_q{lv:04d}@{s}": float(v) for lv, v in zip(JITTER_LEVELS, q, strict=True)})
    # a request joining a running batch lengthens that step for every member
    extra = [g - quiet[s] for s, ph in phases.items() if s in quiet for g in ph["join"]]
    if len(extra) >= 3:
        out["decode_join_stall_s"] = max(0.0, statistics.median(extra))
    return out


def machine_note() -> dict[str, Any]:
    load = os.getloadavg()
    return {"cpus": len(os.sched_getaffinity(0)), "loadavg": [round(x, 2) for x in load],
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def run_profile(engine: Any, model_name: str, hardware: str, plan: Plan, gateway: str | None = None,
                progress: Progress | None = None, decode_workers: int = 1) -> dict[str, Any]:
    """Everything measured, as {"model", "hardware", "machine", "fit", "rows"}. `decode_workers`: the
    gateway's cluster's decode (or mixed) workers, for the host probe's phases."""
    tick = progress or (lambda _msg: None)
    p_rows = prefill_rows(engine, plan, tick)
    d_rows = decode_rows(engine, plan, tick)
    k_rows = kv_rows(engine, plan, tick)
    rows = [_row(model_name, hardware, "prompt", prompt_size=n, batch_size=b, prompt_time=round(s * 1e3, 4))
            for n, b, s in p_rows]
    rows += [_row(model_name, hardware, "token", batch_size=b, token_size=c, token_time=round(s * 1e3, 4))
             for b, c, s in d_rows]
    rows += [_row(model_name, hardware, "kv", kv_bytes=nb, kv_time=round(s * 1e3, 4)) for nb, s in k_rows]
    kv_latency, kv_s_per_byte = fit_linear([nb for nb, _ in k_rows], [s for _, s in k_rows]) if len(k_rows) > 1 else (0, 0)
    # the decode step the overhead probe divides by: the scheduler's time at batch b, context c (linear in c)
    by_b: dict[int, list[tuple[int, float]]] = {}
    for b, c, s in d_rows:
        by_b.setdefault(b, []).append((c, s))

    def step_s(b: int, ctx: int) -> float:
        pts = by_b.get(b) or by_b[min(by_b)]
        if len(pts) < 2:
            return pts[0][1]
        a, slope = fit_linear([c for c, _ in pts], [s for _, s in pts])
        return a + slope * ctx

    single = sorted((n, s) for n, b, s in p_rows if b == 1)

    def prefill_s(n: int) -> float:
        return float(np.interp(n, [x for x, _ in single], [y for _, y in single]))

    overheads = {"request_overhead_s": 0.0, "decode_join_s": 0.0, "decode_step_ratio": 1.0, "prefill_ratio": 1.0}
    if gateway:
        overheads = overhead_values(gateway, step_s, prefill_s, plan.overhead_requests)
        overheads.update(batch_step_ratios(gateway, step_s, [b for b in plan.cluster_batches if b in by_b],
                                           plan.cluster_output, decode_workers=decode_workers))
        sizes = [n for n in plan.ratio_prompts if n <= max(single)[0]]
        if sizes and plan.ratio_rounds > 0:  # paired with the engine alone, minute by minute
            run = EnginePrefill(engine, 1)
            try:
                overheads.update(prefill_ratios(gateway, run, sizes, plan.ratio_rounds))
            finally:
                run.stop()
        overheads.update(host_interference(gateway, decode_workers,
                                           [n for n in plan.host_prompts if n <= max(single)[0]],
                                           plan.host_rounds, plan.host_output, streams=plan.host_streams))
    overheads.update(side_by_side(engine, plan))
    overheads["first_token_after_kv"] = 1.0  # the runtime answers Prefill once the KV push has landed
    overheads["concurrent_phases"] = 1.0  # a mixed worker runs its batcher and scheduler on two threads
    overheads["prefill_padded"] = 1.0  # the engine pads a prefill batch to its longest prompt (Engine.prefill)
    tick("overheads")
    rows += [_row(model_name, hardware, "overhead", name=k, value=round(v, 6)) for k, v in overheads.items()]
    fit = {"kv_latency_s": kv_latency, "kv_gbps": (8 / kv_s_per_byte / 1e9) if kv_s_per_byte > 0 else None,
           **overheads}
    return {"model": model_name, "hardware": hardware, "machine": machine_note(), "fit": fit, "rows": rows}


def write_profile(result: dict[str, Any], path: Path) -> None:
    """CSV (the simulator's table) or JSON (the same rows plus the fit and the machine's load)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".json":
        path.write_text(json.dumps(result, indent=2) + "\n")
        return
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(result["rows"])
