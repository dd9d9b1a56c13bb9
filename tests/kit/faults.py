"""Helpers for the reliability tests: a split cluster whose processes the test owns (to kill, stop, drain one),
a fault-injecting TCP proxy that corrupts one KV chunk in flight, and greedy streams over the gateway's gRPC API.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import yaml

from kit.net import free_port
from services.cluster.launcher import Cluster, ProcSpec, plan
from services.contracts.layout import parse_layout
from services.rpc.tandem.v1 import generation_pb2 as gpb
from services.rpc.tandem.v1 import generation_pb2_grpc as gpb_grpc


@dataclass
class Split:
    """Workers and a gateway started from one layout; `addr[name]` is where the gateway reaches a worker."""

    cluster: Cluster
    http: str
    grpc: str
    addr: dict[str, str]

    def pid(self, name: str) -> int:
        return self.cluster.procs[name].pid

    def signal(self, name: str, sig: int) -> None:
        os.kill(self.pid(name), sig)

    def log(self, name: str) -> str:
        return (self.cluster.log_dir / f"{name}.log").read_text(errors="replace")

    def name_of(self, address: str) -> str:
        return next(n for n, a in self.addr.items() if a == address)


def start_split(tmp: Path, ckpt: str | None, n_prefill: int, n_decode: int, *, decode_batching: dict | None = None,
                gateway: dict | None = None, via: Callable[[str, str], str | None] | None = None) -> Split:
    """Start `n_prefill` + `n_decode` workers and a gateway (each its own process, healthy on return).

    `via(name, address)` may return another address (a proxy) for the gateway to reach that worker through.
    """
    taken: set[int] = set()  # ports promised to a worker (gRPC and metrics) before anything binds them
    pools = [{"role": "prefill", "count": n_prefill, "base_port": _ports(n_prefill, taken)},
             {"role": "decode", "count": n_decode, "base_port": _ports(n_decode, taken),
              **({"batching": decode_batching} if decode_batching else {})}]
    http, grpc_addr = (f"127.0.0.1:{_ports(1, taken, metrics=False)}" for _ in range(2))
    model = {"name": "tiny", "path": ckpt} if ckpt else {}  # None: the embedded SmolLM2-135M
    doc = {"name": "faults", "model": model, "pools": pools,
           "gateway": {"http": http, "grpc": grpc_addr, **(gateway or {})}}
    path = tmp / "layout.yaml"
    path.write_text(yaml.safe_dump(doc))
    specs = plan(parse_layout(doc), str(path))
    workers = [s for s in specs if s.name != "gateway"]
    addr = {s.name: (via and via(s.name, s.grpc or "")) or s.grpc or "" for s in workers}
    gw = next(s for s in specs if s.name == "gateway")
    pairs = [x for s in workers for x in ("--worker", f"{s.name.rsplit('-', 1)[0]}={addr[s.name]}")]
    specs = [*workers, ProcSpec("gateway", [*gw.argv, *pairs], http=gw.http)]
    cluster = Cluster(specs, tmp / "logs")
    cluster.start([s.name for s in workers])
    cluster.wait_healthy([s.name for s in workers], 300)
    cluster.start(["gateway"])
    cluster.wait_healthy(["gateway"], 60)
    return Split(cluster, f"http://{http}", grpc_addr, addr)


def _ports(n: int, taken: set[int], metrics: bool = True) -> int:
    """A base port with n free ports after it (and their metrics ports, +1000), none of them in `taken`."""
    while True:
        base = free_port()
        want = [*range(base, base + n), *(range(base + 1000, base + n + 1000) if metrics else ())]
        if max(want) > 65535 or taken.intersection(want):
            continue
        try:
            for p in want:
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))
        except OSError:
            continue
        taken.update(want)
        return base


@dataclass
class StreamResult:
    token_ids: list[int] = field(default_factory=list)
    finish: int = 0
    workers: list[list[str]] = field(default_factory=list)  # the pair each chunk came from
    error: str | None = None
    code: grpc.StatusCode | None = None


def stream(address: str, prompt_ids: list[int], max_tokens: int, results: list[StreamResult], i: int,
           first: threading.Event | None = None, timeout: float = 120.0) -> None:
    """One greedy gRPC stream (ignore_eos, so every run is max_tokens long); fills results[i]."""
    r = results[i]
    req = gpb.GenerateRequest(token_ids=gpb.TokenIds(ids=prompt_ids))
    req.sampling.max_tokens, req.sampling.temperature, req.sampling.ignore_eos = max_tokens, 0.0, True
    try:
        with grpc.insecure_channel(address) as ch:
            for msg in gpb_grpc.GenerationStub(ch).Generate(req, timeout=timeout):
                r.token_ids.extend(msg.token_ids)
                if not r.workers or list(msg.workers) != r.workers[-1]:
                    r.workers.append(list(msg.workers))
                if msg.finish_reason:
                    r.finish = msg.finish_reason
                if first is not None and len(r.token_ids) >= 5:
                    first.set()
    except grpc.RpcError as exc:
        r.error, r.code = exc.details(), exc.code()


def run_streams(address: str, prompts: list[list[int]], max_tokens: int, during: object = None) -> list[StreamResult]:
    """Every prompt as a concurrent stream; `during(results)` runs in this thread while they flow."""
    results = [StreamResult() for _ in prompts]
    threads = [threading.Thread(target=stream, args=(address, p, max_tokens, results, i), daemon=True)
               for i, p in enumerate(prompts)]
    for t in threads:
        t.start()
    if callable(during):
        during(results)
    for t in threads:
        t.join(180)
    return results


def greedy_mismatch(engine: object, prompt: list[int], out: list[int]) -> int:
    """Where `out` first differs from greedy decoding of `prompt` (-1: nowhere), checked teacher-forced: one
    forward pass over prompt + out scores every position, so a long reference costs one prefill."""
    import torch

    ids = prompt + out[:-1]
    kv = engine.new_kv(1, len(ids))  # type: ignore[attr-defined]
    with torch.inference_mode():
        logits = engine.model(torch.tensor([ids]), kv, torch.tensor([0]), [0])  # type: ignore[attr-defined]
    want = logits[0, len(prompt) - 1:].argmax(-1).tolist()
    return next((i for i, (a, b) in enumerate(zip(out, want, strict=True)) if a != b), -1)


def wait_until(cond: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def stop_split(split: Split) -> None:
    for proc in split.cluster.procs.values():  # a stopped worker must be able to hear SIGTERM
        if proc.poll() is None:
            try:
                os.kill(proc.pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
    split.cluster.stop(grace_s=20)


