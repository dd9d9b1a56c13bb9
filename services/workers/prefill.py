"""The prompt phase: batch waiting prompts under a token budget, stream each layer's KV out as it is computed.

Engine.prefill calls back after every layer; the callback copies that layer's K/V of each prompt into the
request's KVSender while the next layers are still running (Splitwise's layer-wise overlapped transfer). On
CUDA the copy is a device->host copy into pinned memory on its own stream, so compute never waits for it.

`kv_path` picks the transport per push: "grpc" always sends bytes; "auto" and "ipc" (a model on CUDA only)
send CUDA IPC handles instead (services.kv.ipc: the layer is published with an interprocess event recorded
after its kernels, and the decode worker copies it on the GPU), and bytes to a decode worker that refuses
them, from then on.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from services.contracts.errors import InvalidArgument, ResourceExhausted, TandemError, Unavailable
from services.engine import Engine
from services.engine.sampling import Sampler, SamplingParams
from services.grpcutil import get_logger, log
from services.kv.ipc import IpcSender, check_kv_path
from services.kv.sender import Channels, KVSender
from services.kv.wire import DEFAULT_CHUNK, KVSpec, dtype_name
from services.workers.client import PrefillResult, Timings

Layers = list[tuple[torch.Tensor, torch.Tensor]]
Sender = KVSender | IpcSender
logger = get_logger("tandem.worker")


@dataclass(slots=True, eq=False)
class PrefillJob:
    """One prompt. `decode_address` None keeps the KV in-process (mixed worker): it lands in `layers`."""

    request_id: str
    prompt: list[int]
    params: SamplingParams
    decode_address: str | None
    kv_timeout_s: float = 30.0  # from the moment the KV is ready (see KVSender)
    lease_s: float = 0.0
    call_timeout_s: float | None = None  # the request's remaining deadline: the backstop on the whole push
    enqueued: float = field(default_factory=time.perf_counter)
    future: Future = field(default_factory=Future)
    layers: Layers | None = None
    sampler: Sampler | None = None


@dataclass(slots=True)
class _Batch:
    kv: object
    lens: list[int]
    senders: list[Sender | None]


class PrefillBatcher:
    """Owns the prefill queue and thread. submit() is thread-safe; results arrive on each job's future."""

    def __init__(self, engine: Engine, max_batch_tokens: int = 2048, max_batch: int = 32,
                 chunk_bytes: int = DEFAULT_CHUNK, on_push: object = None, overlap: bool = True,
                 max_waiting: int | None = None, kv_path: str = "auto") -> None:
        self.engine = engine
        self.kv_path = check_kv_path(kv_path, engine.device)  # "ipc" on a CPU model is refused here
        # CUDA IPC is tried where it can work: our KV on CUDA, and a decode worker that has not refused it
        self.use_ipc = kv_path != "grpc" and torch.device(engine.device).type == "cuda"
        self._no_ipc: dict[str, str] = {}  # decode address -> why it refused CUDA IPC (bytes from then on)
        self.max_waiting = max_waiting  # prompts held beyond one full batch (queued or pushing); None = unbounded
        self.overlap = overlap  # False: push only after the whole forward pass (the baseline Splitwise improves on)
        self.max_batch_tokens, self.max_batch = max_batch_tokens, max_batch
        self.chunk_bytes = chunk_bytes
        self.on_push = on_push  # callable(bytes, seconds) for metrics
        self.channels = Channels()
        self._cv = threading.Condition()
        self._queue: deque[PrefillJob] = deque()
        self._pending_tokens = 0
        self._active: _Batch | None = None
        self._stopping = False
        self._copy_stream = None  # CUDA: the stream the per-layer device->host KV copies run on
        self._draining = False
        self._unresolved = 0  # jobs submitted whose future is not done yet (queued, running, or pushing)
        self._thread = threading.Thread(target=self._loop, name="prefill-batcher", daemon=True)
        self._thread.start()

    @property
    def pending_tokens(self) -> int:
        return self._pending_tokens

    @property
    def waiting(self) -> int:
        return len(self._queue)

    def submit(self, job: PrefillJob) -> Future:
        cfg = self.engine.cfg
        self.engine.check_prompt(job.prompt)
        if len(job.prompt) >= cfg.max_seq_len:
            raise InvalidArgument(f"prompt of {len(job.prompt)} tokens leaves no room to generate in the context "
                                  f"length {cfg.max_seq_len}", param="prompt")
        job.sampler = Sampler(job.params)  # validates the params
        with self._cv:
            if self._stopping or self._draining:
                raise Unavailable("prefill worker is shutting down")
            if self.max_waiting is not None and self._unresolved >= self.max_batch + self.max_waiting:
                raise ResourceExhausted(f"prefill worker full: {self._unresolved} prompts held (max_batch "
                                        f"{self.max_batch} + max_waiting {self.max_waiting})")
            self._queue.append(job)
            self._pending_tokens += len(job.prompt)
            self._unresolved += 1
            self._cv.notify()
        job.future.add_done_callback(self._resolved)
        return job.future

    def _resolved(self, _future: Future) -> None:
        with self._cv:
            self._unresolved -= 1
            self._cv.notify_all()

    def drain(self, grace_s: float) -> bool:
        """Refuse new prompts; wait up to `grace_s` for every accepted one to finish. True when all did."""
        deadline = time.monotonic() + grace_s
        with self._cv:
            self._draining = True
            while self._unresolved and (left := deadline - time.monotonic()) > 0:
                self._cv.wait(left)
            return self._unresolved == 0

    def stop(self) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        self._thread.join(timeout=10)
        for job in self._queue:
            job.future.set_exception(Unavailable("prefill worker is shutting down"))
        self.channels.close()

    def _take(self) -> list[PrefillJob] | None:
        """FIFO jobs whose prompts fit max_batch_tokens together (a longer prompt runs alone)."""
        with self._cv:
            while not self._queue and not self._stopping:
                self._cv.wait()
            if self._stopping:
                return None
            batch, tokens = [], 0
            while self._queue and len(batch) < self.max_batch:
                n = len(self._queue[0].prompt)
                if batch and tokens + n > self.max_batch_tokens:
                    break
                batch.append(self._queue.popleft())
                tokens += n
            return batch

    def _loop(self) -> None:
        while (batch := self._take()) is not None:
            try:
                self._run(batch)
            except Exception as exc:  # noqa: BLE001 - one bad batch fails its own jobs, never the worker
                err = exc if isinstance(exc, TandemError) else Unavailable(f"prefill failed: {type(exc).__name__}: {exc}")
                for job in batch:
                    if not job.future.done():
                        job.future.set_exception(err)
            finally:
                with self._cv:
                    self._pending_tokens -= sum(len(j.prompt) for j in batch)

    def _layer_done(self, index: int) -> None:
        """Engine.prefill's on_layer: hand layer `index` of every remote prompt to its sender."""
        b = self._active
        if b is None:
            return
        event = None
        for slot, sender in enumerate(b.senders):
            if isinstance(sender, IpcSender):
                if event is None:  # one event per layer, after its kernels, for every shared push of the batch
                    event = torch.cuda.Event(interprocess=True)
                    event.record()
                sender.put(index, event)
            elif sender is not None:
                self._put(sender, index, b.kv, slot, b.lens[slot])

    def _put(self, sender: KVSender, layer: int, kv: object, slot: int, n: int) -> None:
        """On CPU a copy; on CUDA a device->host copy into pinned memory on a copy stream, ordered after the layer's
        kernels by an event, so the compute stream never waits; the sender serializes once `ready` has fired."""
        k, v = kv.k[layer, slot, :n], kv.v[layer, slot, :n]
        if not k.is_cuda:
            sender.put(layer, k.clone(), v.clone())
            return
        if self._copy_stream is None:
            self._copy_stream = torch.cuda.Stream(k.device)
        computed = torch.cuda.Event()
        computed.record()
        hk = torch.empty(k.shape, dtype=k.dtype, pin_memory=True)
        hv = torch.empty(v.shape, dtype=v.dtype, pin_memory=True)
        with torch.cuda.stream(self._copy_stream):
            self._copy_stream.wait_event(computed)
            hk.copy_(k, non_blocking=True)
            hv.copy_(v, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record()
        sender.put(layer, hk, hv, ready)

    def _spec(self, n_tokens: int) -> KVSpec:
        cfg = self.engine.cfg
        return KVSpec(self.engine.fingerprint, cfg.n_layers, dtype_name(self.engine.dtype), n_tokens,
                      cfg.n_kv_heads, cfg.head_dim)

    def _bytes_sender(self, j: PrefillJob) -> KVSender:
        return KVSender(self.channels, j.decode_address, self._spec(len(j.prompt)), j.request_id, j.kv_timeout_s,
                        j.lease_s, self.chunk_bytes, j.call_timeout_s)

    def _open(self, jobs: list[PrefillJob], remote: list[bool], kv: object) -> list[Sender | None]:
        out: list[Sender | None] = []
        for slot, (j, r) in enumerate(zip(jobs, remote, strict=True)):
            if not r:
                out.append(None)
            elif self.use_ipc and j.decode_address not in self._no_ipc:
                try:
                    out.append(IpcSender(self.channels.push_shared(j.decode_address), j.decode_address,
                                         self._spec(len(j.prompt)), j.request_id, j.kv_timeout_s, kv.k, kv.v, slot,
                                         lease_s=j.lease_s, call_timeout_s=j.call_timeout_s,
                                         fallback=self._fallback(j, kv, slot), on_refused=self._refused))
                except RuntimeError as exc:  # this process cannot export its CUDA memory at all
                    self.use_ipc = False
                    log(logger, "cannot share KV over CUDA IPC; every push goes over gRPC", logging.WARNING,
                        reason=str(exc))
                    out.append(self._bytes_sender(j))
            else:
                out.append(self._bytes_sender(j))
        return out

    def _fallback(self, j: PrefillJob, kv: object, slot: int):
        """The same KV as bytes, all layers at once (the decode worker refused CUDA IPC): the receipt."""
        def push():
            s = self._bytes_sender(j)
            for layer in range(self.engine.cfg.n_layers):
                self._put(s, layer, kv, slot, len(j.prompt))
            s.close()
            return s.wait()
        return push

    def _refused(self, address: str, reason: str) -> None:
        if address not in self._no_ipc:
            log(logger, "decode worker refused CUDA IPC; KV to it goes over gRPC from now on", logging.WARNING,
                decode=address, reason=reason)
        self._no_ipc[address] = reason

    def _run(self, jobs: list[PrefillJob]) -> None:
        t0 = time.perf_counter()
        lens = [len(j.prompt) for j in jobs]
        kv = self.engine.new_kv(slots=len(jobs), capacity=max(lens))
        remote = [bool(j.decode_address and j.params.max_tokens > 1) for j in jobs]
        # Overlapped: open every push before the forward pass; the hooks feed it layer by layer. Serial
        # baseline: open it only once the cache is complete (an open push with no data would look stalled).
        senders = self._open(jobs, remote, kv) if self.overlap else [None] * len(jobs)
        self._active = _Batch(kv, lens, senders)
        try:
            logits = self.engine.prefill([j.prompt for j in jobs], kv, list(range(len(jobs))),
                                         self._layer_done if self.overlap else None)
        except BaseException:
            if self._copy_stream is not None:
                self._copy_stream.synchronize()
            for s in senders:
                if s is not None:
                    s.cancel()
            raise
        finally:
            self._active = None
        if not self.overlap:
            senders = self._open(jobs, remote, kv)
            event = None
            for i, s in enumerate(senders):
                if isinstance(s, IpcSender) and event is None:
                    event = torch.cuda.Event(interprocess=True)
                    event.record()
                for layer in range(self.engine.cfg.n_layers) if s is not None else ():
                    if isinstance(s, IpcSender):
                        s.put(layer, event)
                    else:
                        self._put(s, layer, kv, i, lens[i])
        firsts = [j.sampler.sample(logits[i]) for i, j in enumerate(jobs)]
        t1 = time.perf_counter()
        eos = set(self.engine.cfg.eos_ids)
        finished: list[str | None] = []
        for j, tok, s in zip(jobs, firsts, senders, strict=True):
            reason = "stop" if tok in eos and not j.params.ignore_eos else "length" if j.params.max_tokens <= 1 else None
            finished.append(reason)
            if s is not None:
                s.cancel() if reason else s.close()
        for i, j in enumerate(jobs):
            if j.decode_address is None and finished[i] is None:
                j.layers = kv.export(i)
        if self._copy_stream is not None:
            self._copy_stream.synchronize()  # the copies have read `kv` before it goes back to the allocator
        del kv  # the batch's cache is freed here (bytes senders hold their own per-layer copies; shared ones hold
        # the buffer itself until their receipt)
        # Receipts are awaited off the batcher thread, so the next batch computes while this one's tail lands.
        threading.Thread(target=self._finish, args=(jobs, firsts, senders, finished, t0, t1), daemon=True,
                         name="prefill-finish").start()

    def _finish(self, jobs: list[PrefillJob], firsts: list[int], senders: list[Sender | None],
                finished: list[str | None], t0: float, t1: float) -> None:
        for j, tok, s, reason in zip(jobs, firsts, senders, finished, strict=True):
            timings = Timings(queue_s=t0 - j.enqueued, prefill_s=t1 - t0)
            result = PrefillResult(j.request_id, tok, "", len(j.prompt), reason, timings, 0)
            if s is not None and reason is None:
                try:
                    receipt = s.wait()
                except TandemError as exc:
                    # name the decode worker, so the gateway knows which half of the pair to avoid
                    exc.message = f"KV push to {s.address} failed: {exc.message}"
                    j.future.set_exception(exc)
                    continue
                timings.kv_transfer_s = time.perf_counter() - t1
                result.handle, result.kv_bytes, result.kv_path = receipt.handle, receipt.bytes, s.path
                if self.on_push:
                    self.on_push(receipt.bytes, time.perf_counter() - s.started)
            j.future.set_result(result)
