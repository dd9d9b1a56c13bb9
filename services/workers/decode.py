"""The token phase: receive and validate pushed KV (KVTransfer), hold it under a lease, decode and stream it.

KV arrives as bytes (Push) or, from a prefill worker on the same machine and GPU, as CUDA IPC handles
(PushShared: copied device-to-device into this worker's memory before the receipt; services.kv.ipc).

Decoding runs on services.batching's FusionScheduler; this module only turns its emit() callbacks into a
gRPC stream and guarantees the KV is freed on every exit path (finish, cancel, deadline, lease, bad push).
"""

from __future__ import annotations

import logging
import queue
import time
from collections.abc import Callable, Iterator

import grpc

from services.batching.scheduler import NO_TOKEN, DecodeRequest, FusionScheduler
from services.contracts.errors import InvalidArgument, Unavailable
from services.engine import Engine
from services.engine.sampling import SamplingParams
from services.grpcutil import log, request_id
from services.kv.ipc import SETTLED_KEY, IpcReceiver, IpcRefused
from services.kv.proto import Piece
from services.kv.sender import KV_STALL_PER_TOKEN_S
from services.kv.store import Entry, KVStore, Layers
from services.kv.wire import KVAssembler, KVSpec, dtype_name
from services.rpc.tandem.v1 import worker_pb2 as pb
from services.workers.client import sampling_from_pb

LEASE_WAIT_S = 5.0  # draining: how long received KV may wait for its Decode call (its gateway may be gone)


class DecodeWorker:
    """KV store + decode scheduler of one process; the gRPC handlers of KVTransfer and Decode live here."""

    def __init__(self, engine: Engine, scheduler: FusionScheduler, kv_budget_bytes: int, logger: logging.Logger,
                 lease_s: float = 30.0, stall_s: float = 10.0,
                 on_receive: Callable[[int, float], None] | None = None,
                 on_reject: Callable[[str], None] | None = None, max_waiting: int | None = None,
                 kv_path: str = "auto") -> None:
        self.engine, self.scheduler, self.logger = engine, scheduler, logger
        self.ipc = IpcReceiver(engine.device, kv_path)  # refuses shared KV unless on CUDA and kv_path != grpc
        self.on_receive, self.on_reject = on_receive, on_reject
        held = None if max_waiting is None else scheduler.max_batch + max_waiting

        def used() -> int:
            st = scheduler.stats()
            return st["kv_used_bytes"] + st["kv_waiting_bytes"]

        def held_by_scheduler() -> int:
            st = scheduler.stats()
            return st["live"] + st["waiting"]

        self.store = KVStore(kv_budget_bytes, lease_s, stall_s, other_used=used, on_expire=self._expired,
                             max_held=held, other_held=held_by_scheduler)
        cfg = engine.cfg
        self.expect = KVSpec(engine.fingerprint, cfg.n_layers, dtype_name(engine.dtype), 0, cfg.n_kv_heads, cfg.head_dim)

    def _expired(self, entry: Entry, why: str) -> None:
        log(self.logger, f"KV freed: {why}", logging.WARNING, request_id=entry.request_id, bytes=entry.nbytes)

    # ---- KVTransfer ----
    def push(self, chunks: Iterator[pb.KVHeader | Piece | str], context: grpc.ServicerContext) -> pb.KVReceipt:
        rid = request_id(context)
        asm = KVAssembler(self.expect, self.engine.cfg.max_seq_len - 1)
        ticket = None
        t0 = time.perf_counter()
        try:
            first = next(chunks, None)  # messages come parsed by kvproto.parse_chunk (server.py registers it)
            if not isinstance(first, pb.KVHeader):
                raise InvalidArgument(first if isinstance(first, str) else "KV push must start with a header",
                                      param="header")
            spec = asm.header(first)
            rid = first.request_id or rid
            # a long prompt's layers take long to compute (each one arrives after its forward pass): the
            # silence allowed between pieces grows with the prompt, as the sender's own limit does
            ticket = self.store.begin(rid, spec.nbytes, cancel=context.cancel,
                                      stall_s=self.store.stall_s + KV_STALL_PER_TOKEN_S * spec.n_tokens)
            for chunk in chunks:
                if isinstance(chunk, str):
                    raise InvalidArgument(chunk, param="data")
                if not isinstance(chunk, Piece):
                    raise InvalidArgument("KV push carries a second header", param="header")
                self.store.touch(ticket)
                asm.piece(chunk)
            layers = asm.finish()
            handle, lease = self.store.commit(ticket, layers, asm.lease_s)
            ticket = None
        except InvalidArgument as exc:
            if self.on_reject:
                self.on_reject(exc.param or "other")
            log(self.logger, f"KV push rejected: {exc.message}", logging.WARNING, request_id=rid,
                received_bytes=asm.received)
            raise
        finally:
            if ticket is not None:
                self.store.abort(ticket)  # bad, cancelled or stalled push: its memory goes now
        dt = time.perf_counter() - t0
        if self.on_receive:
            self.on_receive(spec.nbytes, dt)
        log(self.logger, "KV received", request_id=rid, bytes=spec.nbytes, tokens=spec.n_tokens, seconds=round(dt, 4))
        return pb.KVReceipt(request_id=rid, handle=handle, bytes=spec.nbytes, receive_s=dt, lease_s=lease)

    def push_shared(self, chunks: Iterator[pb.KVSharedChunk | str], context: grpc.ServicerContext) -> pb.KVReceipt:
        """KVTransfer.PushShared: the same checks and lease as `push`; the bytes come over CUDA IPC."""
        rid = request_id(context)
        asm = KVAssembler(self.expect, self.engine.cfg.max_seq_len - 1)  # the header checks of the bytes path
        ticket = copy = None
        opening = False
        t0 = time.perf_counter()
        try:
            first = next(chunks, None)
            if not isinstance(first, pb.KVSharedChunk) or first.WhichOneof("kind") != "header":
                raise InvalidArgument(first if isinstance(first, str) else "shared KV push must start with a header",
                                      param="header")
            h = first.header
            spec = asm.header(h.kv)
            rid = h.kv.request_id or rid
            src = self.ipc.check(h)  # IpcRefused before anything is held: the sender pushes bytes instead
            ticket = self.store.begin(rid, spec.nbytes, cancel=context.cancel,
                                      stall_s=self.store.stall_s + KV_STALL_PER_TOKEN_S * spec.n_tokens)
            opening = True  # from here on this worker settles the sender's export, whatever happens
            copy = self.ipc.open(h, spec, src)
            for chunk in chunks:
                if isinstance(chunk, str):
                    raise InvalidArgument(chunk, param="layer")
                if chunk.WhichOneof("kind") != "layer":
                    raise InvalidArgument("shared KV push carries a second header", param="header")
                self.store.touch(ticket)
                copy.layer(chunk.layer)
            layers = copy.finish()
            handle, lease = self.store.commit(ticket, layers, asm.lease_s)
            ticket = None
        except IpcRefused as exc:
            log(self.logger, f"KV over CUDA IPC refused: {exc.message}", logging.INFO, request_id=rid)
            raise
        except InvalidArgument as exc:
            if self.on_reject:
                self.on_reject(exc.param or "other")
            log(self.logger, f"shared KV push rejected: {exc.message}", logging.WARNING, request_id=rid,
                received_bytes=copy.received if copy else 0)
            raise
        finally:
            if opening and ticket is not None:  # failed after opening: the sender must not release again
                context.set_trailing_metadata(((SETTLED_KEY, "1"),))
            if copy is not None:
                copy.close()  # copies landed; the sender's memory is let go only now
            if ticket is not None:
                self.store.abort(ticket)
        dt = time.perf_counter() - t0
        if self.on_receive:
            self.on_receive(spec.nbytes, dt)
        log(self.logger, "KV received over CUDA IPC", request_id=rid, bytes=spec.nbytes, tokens=spec.n_tokens,
            seconds=round(dt, 4))
        return pb.KVReceipt(request_id=rid, handle=handle, bytes=spec.nbytes, receive_s=dt, lease_s=lease)

    def release(self, req: pb.KVReleaseRequest, context: grpc.ServicerContext) -> pb.KVReleaseReply:
        return pb.KVReleaseReply(released=self.store.release(req.handle))

    # ---- Decode ----
    def decode(self, req: pb.DecodeRequest, context: grpc.ServicerContext) -> Iterator[pb.DecodeEvent]:
        params = sampling_from_pb(req.sampling)
        if not 0 <= req.first_token < self.engine.cfg.vocab_size:
            raise InvalidArgument(f"first_token {req.first_token} outside the vocabulary", param="first_token")
        entry = self.store.claim(req.handle)
        yield from self.stream(req.request_id or entry.request_id, req.handle, entry.layers, req.first_token,
                               params, context)

    def stream(self, rid: str, key: str, layers: Layers, first_token: int, params: SamplingParams,
               context: grpc.ServicerContext) -> Iterator[pb.DecodeEvent]:
        """Submit to the scheduler and yield its tokens; cancelling the RPC cancels the request there."""
        events: queue.Queue = queue.Queue()
        t0 = time.perf_counter()
        self.scheduler.submit(DecodeRequest(key, layers, first_token, params,
                                            emit=lambda tok, reason: events.put((tok, reason))))
        del layers  # the scheduler owns the KV now
        context.add_callback(lambda: self.scheduler.cancel(key))  # fires on cancel/deadline; harmless after the end
        first = True
        while True:
            try:
                tok, reason = events.get(timeout=0.5)
            except queue.Empty:
                if not context.is_active():
                    self.scheduler.cancel(key)
                    return
                continue
            if reason == "error":
                raise Unavailable(f"decode step failed for request {rid}")
            if reason == "cancelled" and not context.is_active():
                log(self.logger, "decode cancelled by the client; slot and KV freed", request_id=rid)
                return
            ev = pb.DecodeEvent(finish_reason=reason or "")
            if tok != NO_TOKEN:
                ev.token_id = tok
            if first:
                ev.first_decode_s = time.perf_counter() - t0
                first = False
            if tok != NO_TOKEN or reason:
                yield ev
            if reason:
                log(self.logger, "decode finished", request_id=rid, finish_reason=reason)
                return

    def drain(self, grace_s: float) -> bool:
        """Take no new KV; wait up to `grace_s` for received KV to be decoded and live streams to end."""
        self.store.draining = True
        start = time.monotonic()
        while self.store.pushing or not self.scheduler.idle() or (
                self.store.waiting and time.monotonic() - start < min(grace_s, LEASE_WAIT_S)):
            if time.monotonic() - start > grace_s:
                return False
            time.sleep(0.05)
        return True

    def close(self) -> None:
        self.store.close()
