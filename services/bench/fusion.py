"""Fusion vs static vs one-at-a-time on one model, side by side: Poisson arrivals, trace-shaped lengths.

Runs as `tandem bench fusion` or, where only torch/numpy exist (the GPU box), `python -m services.bench.fusion`.
Prefill happens before the clock starts (as on a Splitwise prefill worker); a request "arrives" when its KV
is ready for the decode scheduler, and its latency runs from then to its last token.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

from services.batching.request import NO_TOKEN, DecodeRequest, reserved_tokens
from services.batching.scheduler import MODES, FusionScheduler
from services.bench.fusion_reference import prefill, solo_decode
from services.bench.fusion_reorder import reorder_costs
from services.bench.fusion_workload import Job, Shape, arrival_times, draw_jobs
from services.contracts.metrics import RequestRecord, summarize
from services.engine import Engine, ModelConfig
from services.engine.model import Transformer
from services.engine.sampling import SamplingParams
from services.engine.shapes import SHAPES  # random-weight models with real models' shapes

Progress = Callable[[str, int, int], None]  # (what, done, total)


@dataclass(slots=True)
class BenchConfig:
    model: str = "default"  # "default" = load_engine() (SmolLM2), else a key of SHAPES (random weights)
    device: str | None = None
    dtype: str | None = None  # float32 / bfloat16; None = the engine's default for the device
    n_requests: int = 32
    rates: list[float] | None = None  # requests/s; None = `loads` x the measured one-at-a-time capacity
    loads: list[float] = field(default_factory=lambda: [0.5, 2.0, 8.0])
    max_batch: int = 16
    shape: Shape = field(default_factory=Shape)
    seed: int = 0
    threads: int | None = None  # CPU threads for torch; None = 1 on CPU (see docs/batching.md), untouched on CUDA

    @classmethod
    def quick(cls, **overrides) -> BenchConfig:
        base = dict(n_requests=12, loads=[2.0, 8.0], max_batch=12, shape=Shape(scale=16.0, max_prompt=96, max_new=40))
        base.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**base)


@dataclass(slots=True)
class Prepared:
    job: Job
    prompt_kv: list[tuple[torch.Tensor, torch.Tensor]]
    first_token: int
    params: SamplingParams
    solo: list[int]  # greedy tokens of the solo run


def make_engine(model: str, device: str | None, dtype: str | None) -> tuple[Engine, str]:
    dt = {None: None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    if model == "default":
        from services.contracts.errors import NotFound
        from services.engine import load_engine

        try:
            engine = load_engine(device=device, dtype=dt)
            return engine, f"{engine.name} (load_engine default)"
        except NotFound:
            model = "smollm2-135m"  # not installed here: the same shapes with random weights
    if model not in SHAPES:
        from services.contracts.errors import InvalidArgument

        raise InvalidArgument(f"model must be 'default' or one of {', '.join(SHAPES)} (got {model!r})", param="model")
    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dt = dt or (torch.bfloat16 if dev.startswith("cuda") else torch.float32)
    return random_on_device(SHAPES[model], dev, dt, model), f"{model} (random weights)"


def random_on_device(cfg: ModelConfig, device: str, dtype: torch.dtype, name: str) -> Engine:
    """random_engine's weights, but built and initialised on `device` (a 1B model initialises in seconds on a GPU)."""
    torch.manual_seed(0)
    with torch.device(device):
        model = Transformer(cfg)
        for p in model.parameters():
            if p.dim() > 1:
                torch.nn.init.normal_(p, std=0.02)
    return Engine(model, name=name, device=device, dtype=dtype)


def prepare(engine: Engine, jobs: list[Job], seed: int, progress: Progress | None = None) -> tuple[list[Prepared], float]:
    """Prefill every prompt alone and record its solo greedy run; returns them and seconds per solo token."""
    g = torch.Generator().manual_seed(seed)
    out, solo_s, solo_tokens = [], 0.0, 0
    for i, job in enumerate(jobs):
        prompt = torch.randint(0, engine.cfg.vocab_size, (job.prompt_len,), generator=g).tolist()
        params = SamplingParams(max_tokens=job.max_tokens, temperature=0, ignore_eos=True)  # lengths from the trace
        kv, first = prefill(engine, prompt, params)
        t0 = time.perf_counter()
        solo = solo_decode(engine, kv, first, params)
        solo_s += time.perf_counter() - t0
        solo_tokens += len(solo)
        out.append(Prepared(job, kv, first, params, solo))
        if progress:
            progress("prefill + solo runs", i + 1, len(jobs))
    return out, solo_s / max(solo_tokens, 1)


def warm_up(engine: Engine, max_batch: int, ctx: int) -> None:
    """One decode step at every batch size, so first-call costs stay out of the timed runs."""
    kv = engine.new_kv(max_batch, ctx + 2)
    for b in range(1, max_batch + 1):
        for s in range(b):
            kv.lengths[s] = ctx
        engine.decode([1] * b, kv, slice(0, b))


def run_policy(engine: Engine, policy: str, reqs: list[Prepared], arrivals: list[float], max_batch: int) -> tuple[dict, bool]:
    """Open-loop run: submit each request at its arrival time, step until all are done. (summary, tokens all equal)."""
    cap = max(reserved_tokens(r.job.prompt_len, r.job.max_tokens, engine.cfg.max_seq_len) for r in reqs)
    sched = FusionScheduler(engine, mode=policy, max_batch=max_batch, initial_capacity=cap)
    records = [RequestRecord(f"r{i}", arrivals[i], r.job.prompt_len) for i, r in enumerate(reqs)]
    tokens: list[list[int]] = [[] for _ in reqs]
    done = [False] * len(reqs)
    t0 = time.perf_counter()

    def sink(i: int) -> Callable[[int, str | None], None]:
        def emit(token: int, reason: str | None) -> None:
            now = time.perf_counter() - t0
            if token != NO_TOKEN:
                tokens[i].append(token)
                records[i].token_times_s.append(now)
            if reason is not None:
                records[i].finish_s = now
                done[i] = True
        return emit

    nxt = 0
    while not all(done):
        now = time.perf_counter() - t0
        while nxt < len(reqs) and arrivals[nxt] <= now:
            r = reqs[nxt]
            sched.submit(DecodeRequest(f"r{nxt}", r.prompt_kv, r.first_token, r.params, sink(nxt)))
            nxt += 1
        if sched.idle():
            if nxt < len(reqs):
                time.sleep(max(0.0, arrivals[nxt] - (time.perf_counter() - t0)))
            continue
        sched.step()
    matched = [tokens[i] == r.solo for i, r in enumerate(reqs)]
    summary = summarize(records)
    st = sched.stats()
    out = {"tokens_per_s": summary["tokens_per_s"], "latency_p50_s": summary["e2e_p50_s"],
           "latency_p99_s": summary["e2e_p99_s"], "identical_tokens": all(matched),
           "requests_matched": sum(matched), "duration_s": max(r.finish_s for r in records)}
    out.update({k: summary[k] for k in ("ttft_p50_s", "ttft_p99_s", "tbt_p50_s", "tbt_p99_s", "throughput_rps")})
    out.update({k: st[k] for k in ("iterations", "tokens", "padded_rows", "moves", "reorder_s", "decode_s", "step_s")})
    out["mean_batch"] = (st["tokens"] + st["padded_rows"]) / max(st["iterations"], 1)
    return out, all(matched)


def run_bench(cfg: BenchConfig, progress: Progress | None = None, partial: Callable[[dict], None] | None = None) -> dict:
    """Every policy at every rate on one engine; `partial` gets the runs so far after each rate (for time-boxed runs)."""
    t_start = time.perf_counter()
    engine, label = make_engine(cfg.model, cfg.device, cfg.dtype)
    if cfg.threads is not None or engine.device.type == "cpu":
        # One thread by default: on a shared 2-core box, OpenMP barriers stall for tens of ms per op.
        torch.set_num_threads(cfg.threads or 1)
    jobs, source = draw_jobs(cfg.n_requests, cfg.shape, cfg.seed)
    reqs, solo_token_s = prepare(engine, jobs, cfg.seed, progress)
    warm_up(engine, cfg.max_batch, max(j.prompt_len for j in jobs))
    mean_decode = sum(j.max_tokens - 1 for j in jobs) / len(jobs)
    seq_capacity = 1.0 / (mean_decode * solo_token_s)  # requests/s one-at-a-time can sustain
    rates = cfg.rates or [load * seq_capacity for load in cfg.loads]
    runs, identical = [], True
    total = len(rates) * len(MODES)
    for ri, rate in enumerate(rates):
        arrivals = arrival_times(jobs, rate)
        run = {"rate_rps": rate, "load_vs_sequential": rate / seq_capacity}
        for pi, policy in enumerate(MODES):
            run[policy], same = run_policy(engine, policy, reqs, arrivals, cfg.max_batch)
            identical &= same
            if progress:
                progress(f"rate {rate:.2f} req/s", ri * len(MODES) + pi + 1, total)
        for policy in ("static", "sequential"):
            run[f"fusion_vs_{policy}_tokens_per_s"] = run["fusion"]["tokens_per_s"] / run[policy]["tokens_per_s"]
            run[f"fusion_vs_{policy}_latency_p50"] = run[policy]["latency_p50_s"] / run["fusion"]["latency_p50_s"]
        runs.append(run)
        if partial:
            partial({"partial": True, "runs": runs, "identical_tokens": identical, "solo_token_s": solo_token_s})
    head = max(runs, key=lambda r: r["rate_rps"])  # the top-level numbers: the heaviest load
    cfg_out = asdict(cfg)
    cfg_out["rates"] = rates
    return {
        **{p: head[p] for p in MODES},
        "identical_tokens": identical,
        "headline_rate_rps": head["rate_rps"],
        "runs": runs,
        "reorder": reorder_costs(engine, cfg.max_batch, max(j.prompt_len + j.max_tokens for j in jobs)),
        "model": label, "device": str(engine.device), "dtype": str(engine.dtype).replace("torch.", ""),
        "trace": source, "config": cfg_out, "solo_token_s": solo_token_s,
        "sequential_capacity_rps": seq_capacity, "mean_decode_tokens": mean_decode,
        "prompt_lens": [j.prompt_len for j in jobs], "max_tokens": [j.max_tokens for j in jobs],
        "wall_s": time.perf_counter() - t_start, "torch": torch.__version__, "threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name() if engine.device.type == "cuda" else None,
    }


def table(result: dict) -> str:
    """The benchmark as a markdown table (what docs/batching.md shows)."""
    lines = ["| rate req/s (load) | policy | tokens/s | p50 latency s | p99 latency s | mean batch | tokens = solo |",
             "| --- | --- | ---: | ---: | ---: | ---: | --- |"]
    for run in result["runs"]:
        for p in MODES:
            r = run[p]
            lines.append(f"| {run['rate_rps']:.2f} ({run['load_vs_sequential']:.1f}x) | {p} | {r['tokens_per_s']:.1f} | "
                         f"{r['latency_p50_s']:.2f} | {r['latency_p99_s']:.2f} | {r['mean_batch']:.1f} | "
                         f"{r['requests_matched']}/{len(result['max_tokens'])} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m services.bench.fusion", description=__doc__)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", dest="json_path")
    ap.add_argument("--rates", help="comma-separated arrival rates in requests/s (default: loads x sequential capacity)")
    ap.add_argument("--loads", help="comma-separated multiples of the one-at-a-time capacity")
    ap.add_argument("--model", default="default")
    ap.add_argument("--device")
    ap.add_argument("--dtype")
    ap.add_argument("--requests", type=int)
    ap.add_argument("--max-batch", type=int)
    ap.add_argument("--scale", type=float, help="divide trace lengths by this")
    ap.add_argument("--max-prompt", type=int)
    ap.add_argument("--max-new", type=int)
    ap.add_argument("--threads", type=int)
    a = ap.parse_args(argv)
    cfg = config_from(a.quick, a.rates, a.loads, a.model, a.device, a.dtype, a.requests, a.max_batch, a.scale,
                      a.max_prompt, a.max_new, a.threads)
    def write(result: dict) -> None:
        if a.json_path:
            with open(a.json_path, "w") as f:
                json.dump(result, f, indent=2)

    result = run_bench(cfg, lambda what, i, n: print(f"{what}: {i}/{n}", file=sys.stderr, flush=True), write)
    print(table(result))
    print(json.dumps({k: result[k] for k in ("identical_tokens", "headline_rate_rps", "model", "wall_s")}))
    write(result)
    return 0


def parse_floats(text: str | None, name: str) -> list[float] | None:
    if text is None:
        return None
    try:
        vals = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        vals = []
    if not vals or any(not v > 0 for v in vals):
        from services.contracts.errors import InvalidArgument

        raise InvalidArgument(f"{name} must be comma-separated positive numbers (got {text!r})", param=name)
    return vals


def config_from(quick: bool, rates: str | None, loads: str | None, model: str, device: str | None, dtype: str | None,
                requests: int | None, max_batch: int | None, scale: float | None, max_prompt: int | None,
                max_new: int | None, threads: int | None = None) -> BenchConfig:
    """Validate the flags at the edge and build the config (shared by the CLI verb and `python -m`)."""
    from services.contracts.errors import InvalidArgument

    for name, v in (("requests", requests), ("max_batch", max_batch), ("max_prompt", max_prompt), ("max_new", max_new),
                    ("threads", threads)):
        if v is not None and v < 1:
            raise InvalidArgument(f"{name} must be >= 1 (got {v})", param=name)
    if max_new is not None and max_new < 2:
        raise InvalidArgument(f"max_new must be >= 2 (got {max_new}): a request decodes at least one token",
                              param="max_new")
    if scale is not None and not scale > 0:
        raise InvalidArgument(f"scale must be > 0 (got {scale})", param="scale")
    if device is not None and device != "cpu" and not device.startswith("cuda"):
        raise InvalidArgument(f"device must be cpu or cuda (got {device!r})", param="device")
    if device is not None and device.startswith("cuda") and not torch.cuda.is_available():
        raise InvalidArgument("device 'cuda' requested but CUDA is not available on this machine", param="device")
    if dtype not in (None, "float32", "bfloat16", "float16"):
        raise InvalidArgument(f"dtype must be float32, bfloat16 or float16 (got {dtype!r})", param="dtype")
    base = BenchConfig.quick() if quick else BenchConfig()
    sh = base.shape
    shape = Shape(scale if scale is not None else sh.scale, max_prompt or sh.max_prompt, max_new or sh.max_new)
    return BenchConfig(model=model, device=device, dtype=dtype, n_requests=requests or base.n_requests,
                       rates=parse_floats(rates, "rates"), loads=parse_floats(loads, "loads") or base.loads,
                       max_batch=max_batch or base.max_batch, shape=shape, seed=base.seed,
                       threads=threads)


if __name__ == "__main__":
    from services.contracts.errors import TandemError

    try:
        sys.exit(main())
    except TandemError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        sys.exit(2)
