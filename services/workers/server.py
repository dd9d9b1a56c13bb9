"""One worker process: `serve(role, address, model, batching, metrics_port, ready_event)` for prefill/decode/mixed.

Health stays NOT_SERVING until the model is loaded; every service also has reflection, Prometheus metrics
and JSON logs carrying the request id. `python -m services.workers.server ROLE --address ...` runs one.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import threading
import time
from typing import Any

import grpc

from services.contracts.errors import InvalidArgument, TandemError, Unavailable
from services.contracts.roles import DECODE_ROLES, LLM_ROLES, PREFILL_ROLES
from services.grpcutil import Server, get_logger, log, request_id, rpc_errors
from services.kv.ipc import KV_PATHS, check_kv_path, parse_shared
from services.kv.proto import parse_chunk
from services.kv.sender import push_timeout
from services.kv.wire import DEFAULT_CHUNK, dtype_name
from services.registry.connect import worker_heartbeat
from services.registry.live import WorkerRecord
from services.rpc.tandem.v1 import worker_pb2 as pb
from services.rpc.tandem.v1 import worker_pb2_grpc as rpc
from services.workers.client import sampling_from_pb
from services.workers.metrics import WorkerMetrics
from services.workers.mixed import MixedWorker, result_to_pb, wait_result
from services.workers.prefill import PrefillJob

SERVICES = [f"tandem.v1.{n}" for n in ("Prefill", "Decode", "KVTransfer", "Worker")]
DEFAULT_KV_BUDGET = 1 << 30
logger = get_logger("tandem.worker")


class WrongRole(TandemError):
    code = "FAILED_PRECONDITION"
    http_status = 400
    openai_type = "invalid_request_error"


def set_threads(threads: int | None) -> int:
    """Torch intra-op threads: `threads`, else OMP_NUM_THREADS, else all cores but one.

    The spare core is for gRPC and KV (de)serialization threads: when they preempt an OpenMP worker thread,
    every parallel region waits at its barrier (measured: a 16-token prefill went from 5 ms to 1.5 s on 2 cores).
    """
    import torch

    if threads is None and os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()
    n = threads or max(1, len(os.sched_getaffinity(0)) - 1)
    torch.set_num_threads(n)
    return n


class WorkerServer:
    """Engine + the role's parts + the gRPC server. start() loads the model and only then reports SERVING."""

    def __init__(self, role: str, address: str, model: str | None = None, batching: Any = None,
                 metrics_port: int | None = None, *, kv_lease_s: float = 30.0, kv_stall_s: float = 10.0,
                 kv_timeout_s: float = 30.0, chunk_bytes: int = DEFAULT_CHUNK, device: str | None = None,
                 kv_overlap: bool = True, threads: int | None = None, dtype: str | None = None,
                 kv_path: str = "auto") -> None:
        if role not in LLM_ROLES:
            raise InvalidArgument(f"role must be one of {', '.join(LLM_ROLES)} (got {role!r})", param="role")
        from services.contracts.layout import Batching

        self.role, self.model_spec, self.device, self.dtype = role, model, device, dtype
        self.batching = batching if batching is not None else Batching()
        self.metrics_port = metrics_port
        self.kv_overlap, self.threads = kv_overlap, threads
        self.kv_path = check_kv_path(kv_path)  # and against the model's device once it is loaded
        self.kv_lease_s, self.kv_stall_s, self.kv_timeout_s, self.chunk_bytes = kv_lease_s, kv_stall_s, kv_timeout_s, chunk_bytes
        self.engine = self.batcher = self.decoder = self.mixed = self.scheduler = None
        self.draining = False
        # Every request the worker holds (a live or waiting Decode stream, a queued or running Prefill) holds a server
        # thread; leave room for pushes, Info and Generate beside them: an Info queued behind held requests times
        # out, and the gateway's poller then drops the worker as dead (found by `tandem bench soak`).
        held = self.batching.max_batch + self.batching.waiting_bound()
        self.server = Server(address, [self._add], SERVICES, max_workers=max(32, held + self.batching.max_batch + 16))
        self.address = self.server.address

    def _add(self, server: grpc.Server) -> None:
        rpc.add_PrefillServicer_to_server(_Prefill(self), server)
        rpc.add_DecodeServicer_to_server(_Decode(self), server)
        kv = _KVTransfer(self)  # registered by hand: Push parses pieces without copying their bytes (kvproto)
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("tandem.v1.KVTransfer", {
            "Push": grpc.stream_unary_rpc_method_handler(kv.Push, request_deserializer=parse_chunk,
                                                         response_serializer=pb.KVReceipt.SerializeToString),
            "PushShared": grpc.stream_unary_rpc_method_handler(kv.PushShared, request_deserializer=parse_shared,
                                                               response_serializer=pb.KVReceipt.SerializeToString),
            "Release": grpc.unary_unary_rpc_method_handler(kv.Release, request_deserializer=pb.KVReleaseRequest.FromString,
                                                           response_serializer=pb.KVReleaseReply.SerializeToString),
        }),))
        rpc.add_WorkerServicer_to_server(_Worker(self), server)

    def start(self) -> WorkerServer:
        self.server.start()
        if self.metrics_port is not None:
            from prometheus_client import start_http_server

            # next to the worker's own gRPC address (loopback unless the layout binds wider), never 0.0.0.0 by default
            start_http_server(self.metrics_port, addr=self.address.rsplit(":", 1)[0].strip("[]") or "127.0.0.1")
        self._load()
        self.server.ready()
        log(logger, "worker ready", role=self.role, address=self.address, model=self.engine.name,
            fingerprint=self.engine.fingerprint, metrics_port=self.metrics_port, device=str(self.engine.device),
            kv_path=self.kv_path, cuda_ipc="on" if self._ipc_on() else "off")
        return self

    def _load(self) -> None:
        from services.batching.scheduler import FusionScheduler
        from services.workers.decode import DecodeWorker
        from services.workers.modelspec import load_model
        from services.workers.prefill import PrefillBatcher

        set_threads(self.threads)
        self.engine = load_model(self.model_spec, self.device, self.dtype)
        check_kv_path(self.kv_path, self.engine.device)
        b = self.batching
        budget = int(b.kv_budget_mb * 2**20) if b.kv_budget_mb else DEFAULT_KV_BUDGET
        self.metrics = WorkerMetrics(self.address, running=self._live, waiting=self._waiting,
                                     queue_tokens=lambda: self.batcher.pending_tokens if self.batcher else 0,
                                     kv_free=lambda: self.decoder.store.free_bytes if self.decoder else 0)
        if self.role in PREFILL_ROLES:
            self.batcher = PrefillBatcher(self.engine, b.max_batch_tokens, b.max_batch, self.chunk_bytes,
                                          on_push=self.metrics.pushed, overlap=self.kv_overlap,
                                          max_waiting=b.waiting_bound(), kv_path=self.kv_path)
        if self.role in DECODE_ROLES:
            self.scheduler = FusionScheduler(self.engine, b.policy, b.max_batch, budget)
            self.scheduler.start()
            self.decoder = DecodeWorker(self.engine, self.scheduler, budget, logger, self.kv_lease_s, self.kv_stall_s,
                                        on_receive=self.metrics.received, on_reject=self.metrics.rejected,
                                        max_waiting=b.waiting_bound(), kv_path=self.kv_path)
        if self.role == "mixed":
            self.mixed = MixedWorker(self.batcher, self.decoder)

    def _ipc_on(self) -> bool:
        """Whether this worker sends (prefill) or takes (decode) KV over CUDA IPC at all."""
        if self.batcher is not None and self.batcher.use_ipc:
            return True
        return self.decoder is not None and not self.decoder.ipc.refusal

    def _live(self) -> int:
        return self.scheduler.stats()["live"] if self.scheduler else 0

    def _waiting(self) -> int:
        n = self.batcher.waiting if self.batcher else 0
        if self.decoder:
            n += self.decoder.store.waiting + self.scheduler.stats()["waiting"]
        return n

    def need(self, part: str) -> Any:
        if self.engine is None:
            raise Unavailable("the worker is still loading its model")
        value = getattr(self, part)
        if value is None:
            raise WrongRole(f"this is a {self.role} worker; it does not serve {part}")
        return value

    def info(self) -> pb.WorkerInfo:
        e = self.need("engine")
        if self.draining:  # routers treat the worker as down from now on
            raise Unavailable(f"worker {self.address} is draining")
        total = self.decoder.store.budget_bytes if self.decoder else 0
        return pb.WorkerInfo(
            role=self.role, model=self.model_spec or e.name, fingerprint=e.fingerprint, address=self.address,
            pending_prompt_tokens=self.batcher.pending_tokens if self.batcher else 0, live_requests=self._live(),
            waiting_requests=self._waiting(), kv_free_bytes=self.decoder.store.free_bytes if self.decoder else 0,
            kv_total_bytes=total, max_seq_len=e.cfg.max_seq_len, vocab_size=e.cfg.vocab_size,
            kv_dtype=dtype_name(e.dtype))

    def drain(self, grace_s: float) -> bool:
        """SIGTERM: report NOT_SERVING, refuse new prompts and KV, let accepted requests finish (up to grace_s)."""
        self.draining = True
        self.server.health.enter_graceful_shutdown()
        deadline = time.monotonic() + grace_s
        done = True
        if self.batcher:
            done = self.batcher.drain(grace_s) and done
        if self.decoder:
            done = self.decoder.drain(max(0.0, deadline - time.monotonic())) and done
        return done

    def record(self, address: str | None = None, index: int = 0) -> WorkerRecord:
        """What this worker registers and renews: `address` is how others reach it (default: where it listens,
        with a wildcard host replaced by this machine's name)."""
        if address is None:
            host, _, port = self.address.rpartition(":")
            address = f"{socket.gethostname()}:{port}" if host in ("0.0.0.0", "[::]", "::", "") else self.address
        return WorkerRecord.from_info(self.info(), address, index, self.batching.max_batch, self.metrics_port)

    def stop(self, grace: float = 2.0) -> None:
        self.server.stop(grace)
        if self.batcher:
            self.batcher.stop()
        if self.scheduler:
            self.scheduler.stop()
        if self.decoder:
            self.decoder.close()


class _Prefill(rpc.PrefillServicer):
    def __init__(self, w: WorkerServer) -> None:
        self.w = w

    @rpc_errors(logger)
    def Prefill(self, req: pb.PrefillRequest, context: grpc.ServicerContext) -> pb.PrefillResponse:  # noqa: N802
        batcher = self.w.need("batcher")
        rid = req.request_id or request_id(context)
        params = sampling_from_pb(req.sampling)
        if not req.decode_address and params.max_tokens > 1:
            raise InvalidArgument("decode_address is required when max_tokens > 1", param="decode_address")
        if req.kv_timeout_s < 0:
            raise InvalidArgument(f"kv_timeout_s must be >= 0 (got {req.kv_timeout_s})", param="kv_timeout_s")
        # the KV limit runs from when the KV is ready; the caller's deadline bounds the whole call
        timeout = req.kv_timeout_s or push_timeout(len(req.prompt_ids), self.w.kv_timeout_s)
        job = PrefillJob(rid, list(req.prompt_ids), params, req.decode_address or None, timeout,
                         call_timeout_s=context.time_remaining())
        batcher.submit(job)
        result = wait_result(job, context)
        log(logger, "prefill done", request_id=rid, prompt_tokens=result.prompt_tokens, kv_bytes=result.kv_bytes,
            queue_s=round(result.timings.queue_s, 4), prefill_s=round(result.timings.prefill_s, 4),
            kv_transfer_s=round(result.timings.kv_transfer_s, 4))
        return result_to_pb(result)


class _Decode(rpc.DecodeServicer):
    def __init__(self, w: WorkerServer) -> None:
        self.w = w

    @rpc_errors(logger)
    def Decode(self, req: pb.DecodeRequest, context: grpc.ServicerContext):  # noqa: N802
        yield from self.w.need("decoder").decode(req, context)


class _KVTransfer(rpc.KVTransferServicer):
    def __init__(self, w: WorkerServer) -> None:
        self.w = w

    @rpc_errors(logger)
    def Push(self, chunks, context: grpc.ServicerContext) -> pb.KVReceipt:  # noqa: N802
        return self.w.need("decoder").push(chunks, context)

    @rpc_errors(logger)
    def PushShared(self, chunks, context: grpc.ServicerContext) -> pb.KVReceipt:  # noqa: N802
        return self.w.need("decoder").push_shared(chunks, context)

    @rpc_errors(logger)
    def Release(self, req: pb.KVReleaseRequest, context: grpc.ServicerContext) -> pb.KVReleaseReply:  # noqa: N802
        return self.w.need("decoder").release(req, context)


class _Worker(rpc.WorkerServicer):
    def __init__(self, w: WorkerServer) -> None:
        self.w = w

    @rpc_errors(logger)
    def Info(self, req: pb.WorkerInfoRequest, context: grpc.ServicerContext) -> pb.WorkerInfo:  # noqa: N802
        return self.w.info()

    @rpc_errors(logger)
    def Generate(self, req: pb.MixedRequest, context: grpc.ServicerContext):  # noqa: N802
        yield from self.w.need("mixed").generate(req, context)


def serve(role: str, address: str, model: str | None = None, batching: Any = None, metrics_port: int | None = None,
          ready_event: threading.Event | None = None, stop_event: threading.Event | None = None, **opts: Any) -> None:
    """Run one worker until SIGINT/SIGTERM (or `stop_event`); `ready_event` is set once it is SERVING.

    With `registry=redis://...` it registers once ready, renews a heartbeat with its load, and deregisters
    first when it stops (`advertise`: the address others reach it at; `index`: its place in its pool). Then
    it drains: health NOT_SERVING, no new work, accepted requests finish within `drain_s`.
    """
    registry, advertise, index = opts.pop("registry", "memory"), opts.pop("advertise", None), opts.pop("index", 0)
    drain_s = opts.pop("drain_s", 30.0)
    stop = stop_event or threading.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
    worker = WorkerServer(role, address, model, batching, metrics_port, **opts).start()
    beat = worker_heartbeat(registry, lambda: worker.record(advertise, index))
    if ready_event is not None:
        ready_event.set()
    try:
        stop.wait()
    finally:
        if beat is not None:
            beat.stop()  # deregister first: routers stop sending work here
        log(logger, "worker draining", role=role, address=worker.address, grace_s=drain_s)
        done = worker.drain(drain_s)
        log(logger, "worker stopping", role=role, address=worker.address, drained=done)
        worker.stop()


def main() -> None:
    from services.contracts.layout import Batching

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("role", choices=LLM_ROLES)
    p.add_argument("--address", default="127.0.0.1:0")
    p.add_argument("--model", default=None, help="checkpoint path, random:tiny, random:<json>; default SmolLM2")
    p.add_argument("--metrics-port", type=int, default=None)
    p.add_argument("--policy", default="fusion")
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--max-batch-tokens", type=int, default=2048)
    p.add_argument("--kv-budget-mb", type=float, default=None)
    p.add_argument("--max-waiting", type=int, default=None, help="requests held beyond the batch (default 2 x max-batch)")
    p.add_argument("--drain-s", type=float, default=30.0, help="on SIGTERM, seconds accepted requests may take")
    p.add_argument("--kv-lease-s", type=float, default=30.0)
    p.add_argument("--kv-stall-s", type=float, default=10.0)
    p.add_argument("--kv-timeout-s", type=float, default=30.0)
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                   help="weights and KV (default: bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: cores - 1)")
    p.add_argument("--no-kv-overlap", action="store_true", help="push KV after the forward pass (baseline)")
    p.add_argument("--kv-path", default="auto", choices=KV_PATHS,
                   help="KV transport: grpc (bytes), ipc (CUDA IPC handles; the model must be on CUDA), auto "
                        "(CUDA IPC where both workers can, gRPC elsewhere); a decode worker that cannot take "
                        "IPC answers so and the prefill worker sends bytes")
    p.add_argument("--registry", default="memory", help="'memory' or redis://HOST:PORT/DB[?ttl_s=S] to register in")
    p.add_argument("--advertise", default=None, help="HOST:PORT others reach this worker at (registry record)")
    a = p.parse_args()
    batching = Batching(policy=a.policy, max_batch=a.max_batch, max_batch_tokens=a.max_batch_tokens,
                        kv_budget_mb=a.kv_budget_mb, max_waiting=a.max_waiting)
    try:
        serve(a.role, a.address, a.model, batching, a.metrics_port, kv_lease_s=a.kv_lease_s, kv_stall_s=a.kv_stall_s,
              kv_timeout_s=a.kv_timeout_s, device=a.device, dtype=a.dtype, kv_overlap=not a.no_kv_overlap,
              threads=a.threads, kv_path=a.kv_path,
              registry=a.registry, advertise=a.advertise, drain_s=a.drain_s)
    except TandemError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
