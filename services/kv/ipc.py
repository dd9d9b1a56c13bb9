"""Co-located KV transfer over CUDA IPC (KVTransfer.PushShared): handles on the wire, bytes stay on the GPU.

When the prefill and decode workers share a machine and a GPU, the prefill
worker exports its batch KV buffer's device memory with torch's CUDA IPC (`UntypedStorage._share_cuda_`, as
torch.multiprocessing does) and streams, per layer, only the byte offsets of that layer's K and V and an
interprocess CUDA event recorded after the layer's kernels. The decode worker opens the memory
(`UntypedStorage._new_shared_cuda`), makes its own copy stream wait on each event, copies the layer
device-to-device into memory of its own, and answers with the same KVReceipt as the bytes path once every
copy has landed. The prefill worker holds the buffer until then.

A receiver that cannot take it (another machine, the same process, a model not on CUDA, another GPU,
`kv_path: grpc`, a handle that does not open) answers FAILED_PRECONDITION before it holds
anything; the sender then pushes the same KV as bytes (`KVSender`) and sends bytes to that address from
then on.

Memory safety rests on torch's reference counter for shared CUDA memory: a block the receiver has open is
parked by the sender's allocator until the receiver drops it, and the receiver drops it only after its copy
stream has finished reading. Every export is settled exactly once: by the receiver dropping what it opened
(and releasing what it could not open), or, when a push fails before the receiver opened anything, by the
sender (`SETTLED_KEY`). A push the sender abandons (its deadline, a cancel) leaves that to the receiver; if
the receiver never opened it, the memory stays parked until the sender exits.
"""

from __future__ import annotations

import itertools
import logging
import os
import queue
import socket
import threading
import time
from collections.abc import Callable, Iterator
from functools import cache
from typing import Any

import grpc
import torch

from services.contracts.errors import InvalidArgument, TandemError, Unavailable
from services.grpcutil import REQUEST_ID_KEY, error_from_rpc, get_logger, log
from services.kv.sender import receipt_within
from services.kv.wire import DTYPES, KVSpec
from services.rpc.tandem.v1 import worker_pb2 as pb

KV_PATHS = ("auto", "grpc", "ipc")
# Status codes on which the sender pushes the same KV as bytes instead: the receiver refused the handles,
# or it is a build without PushShared.
FALLBACK_CODES = (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.UNIMPLEMENTED)
# Trailing metadata of a failed PushShared whose receiver has settled the exported memory's reference counters
# itself (it opened the storages, or released the ones it could not open). Without it the sender releases them:
# the receiver refused or failed before it opened anything.
SETTLED_KEY = "tandem-ipc-settled"
_DONE = object()
_generation = itertools.count(1)
logger = get_logger("tandem.worker")


class IpcRefused(TandemError):
    """The receiver cannot take this KV over CUDA IPC; the sender falls back to the bytes path."""

    code = "FAILED_PRECONDITION"
    http_status = 400
    openai_type = "invalid_request_error"


def check_kv_path(kv_path: str, device: torch.device | None = None) -> str:
    """`kv_path` validated; with the worker's device, `ipc` is refused where it could never be used."""
    if kv_path not in KV_PATHS:
        raise InvalidArgument(f"kv_path must be one of {', '.join(KV_PATHS)} (got {kv_path!r})", param="kv_path")
    if kv_path == "ipc" and device is not None and torch.device(device).type != "cuda":
        raise InvalidArgument(f"kv_path 'ipc' needs the worker's model on a CUDA device (it is on "
                              f"{torch.device(device).type}); use 'auto' (CUDA IPC where it can work, gRPC "
                              "elsewhere) or 'grpc'", param="kv_path")
    return kv_path


@cache
def host_id() -> str:
    """This machine's identity: the Linux boot id (shared by the containers of one machine), else the hostname."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return socket.gethostname()


def device_uuid(index: int) -> str:
    return str(torch.cuda.get_device_properties(index).uuid)


def local_device(uuid: str) -> int | None:
    """The index under which this process sees the GPU `uuid` (None when CUDA_VISIBLE_DEVICES hides it)."""
    for i in range(torch.cuda.device_count()):
        if device_uuid(i) == uuid:
            return i
    return None


def share(t: torch.Tensor) -> pb.CudaStorageHandle:
    """Export the device memory under `t` (its whole storage); one receiver must open or release it."""
    (_, handle, size, offset, rc_handle, rc_offset, ev_handle,
     ev_sync) = t.untyped_storage()._share_cuda_()
    return pb.CudaStorageHandle(handle=handle, size_bytes=size, offset_bytes=offset, ref_counter_handle=rc_handle,
                                ref_counter_offset=rc_offset, event_handle=ev_handle or b"",
                                event_sync_required=bool(ev_sync))


def unshare(h: pb.CudaStorageHandle) -> None:
    """The sender's side of a refusal: no receiver will open `h`, so drop the reference it was exported with
    (else the allocator would park the memory for a receiver that never comes)."""
    try:
        torch.UntypedStorage._release_ipc_counter_cuda(h.ref_counter_handle, h.ref_counter_offset)
    except Exception:  # noqa: BLE001 - best effort, as torch's own release is
        pass


def open_shared(h: pb.CudaStorageHandle, device: int) -> torch.UntypedStorage:
    return torch.UntypedStorage._new_shared_cuda(device, h.handle, h.size_bytes, h.offset_bytes, h.ref_counter_handle,
                                                 h.ref_counter_offset, h.event_handle, h.event_sync_required)


def parse_shared(raw: bytes) -> pb.KVSharedChunk | str:
    """A PushShared message, or an error message (a gRPC deserializer must not raise)."""
    try:
        return pb.KVSharedChunk.FromString(raw)
    except Exception as exc:  # noqa: BLE001 - DecodeError and friends
        return f"undecodable shared KV chunk: {exc}"


# ---------------------------------------------------------------------------------------------- sender


class IpcSender:
    """One request's KV over PushShared, fed layer by layer: `put(layer, event)` from the compute thread,
    `close()` after the last layer, `wait()` for the receipt. Holds the batch's K and V buffers until then.

    `k`, `v`: the batch KV buffers [n_layers, slots, capacity, n_kv_heads, head_dim] on CUDA; this request
    is `slot`. `fallback()` pushes the same KV as bytes and returns that receipt; `wait()` calls it when the
    receiver refuses (then `path` becomes "grpc" and `on_refused(address, reason)` is called once).
    """

    path = "ipc"

    def __init__(self, push: grpc.StreamUnaryMultiCallable, address: str, spec: KVSpec, request_id: str,
                 timeout_s: float, k: torch.Tensor, v: torch.Tensor, slot: int, *, lease_s: float = 0.0,
                 call_timeout_s: float | None = None, fallback: Callable[[], pb.KVReceipt] | None = None,
                 on_refused: Callable[[str, str], None] | None = None) -> None:
        self.address, self.spec, self.request_id, self.timeout_s = address, spec, request_id, timeout_s
        self.fallback, self.on_refused = fallback, on_refused
        self._k, self._v = k, v
        n, item = spec.n_tokens, k.element_size()
        self._offsets = [(k[i, slot, :n].storage_offset() * item, v[i, slot, :n].storage_offset() * item)
                         for i in range(spec.n_layers)]
        self.generation = next(_generation)
        shared_k = share(k)
        try:
            shared_v = share(v)
        except BaseException:
            unshare(shared_k)
            raise
        self._shared = (shared_k, shared_v)
        self._events: list[Any] = []  # kept alive until the receipt: the receiver waits on them
        header = pb.KVSharedHeader(kv=spec.header(request_id, lease_s).header, host_id=host_id(), pid=os.getpid(),
                                   device_uuid=device_uuid(k.device.index),
                                   k=self._shared[0], v=self._shared[1], generation=self.generation)
        self._header = pb.KVSharedChunk(header=header)
        self._q: queue.Queue = queue.Queue()
        self.started = time.perf_counter()
        self.ready_at = 0.0
        self._future = push.future(self._chunks(), timeout=call_timeout_s, metadata=((REQUEST_ID_KEY, request_id),))

    def _chunks(self) -> Iterator[pb.KVSharedChunk]:
        yield self._header
        while True:
            try:
                item = self._q.get(timeout=0.25)
            except queue.Empty:
                fut = getattr(self, "_future", None)  # gRPC may pull the header before __init__ returns
                if fut is not None and fut.done():
                    return
                continue
            if item is _DONE:
                return
            layer, event = item
            k_off, v_off = self._offsets[layer]
            yield pb.KVSharedChunk(layer=pb.KVSharedLayer(layer=layer, generation=self.generation, k_offset=k_off,
                                                          v_offset=v_off,
                                                          event_handle=event.ipc_handle() if event is not None else b""))

    def put(self, layer: int, event: Any = None) -> None:
        """Publish layer `layer`; `event` (a torch.cuda.Event(interprocess=True)) was recorded after its kernels."""
        if event is not None:
            self._events.append(event)
        self._q.put((layer, event))

    def close(self) -> None:
        self.ready_at = time.perf_counter()
        self._q.put(_DONE)

    def cancel(self) -> None:
        self._future.cancel()
        self._q.put(_DONE)
        self._drop()

    def _drop(self) -> None:
        """Let go of the batch buffers (the caller frees them once every sender of the batch has)."""
        self._k = self._v = self.fallback = None
        self._events = []

    def wait(self) -> pb.KVReceipt:
        """The receipt (over IPC, or over bytes after a refusal); failures as services.contracts.errors."""
        try:
            return receipt_within(self._future, self.timeout_s, self.ready_at,
                                  f"KV push (CUDA IPC) to {self.address}", self.spec.n_tokens)
        except grpc.FutureCancelledError:
            raise Unavailable(f"KV push (CUDA IPC) to {self.address} was cancelled") from None
        except grpc.RpcError as exc:
            if not any(key == SETTLED_KEY for key, _ in (exc.trailing_metadata() or ())):
                for h in self._shared:  # the receiver failed before it opened anything
                    unshare(h)
            if exc.code() not in FALLBACK_CODES or self.fallback is None:
                raise error_from_rpc(exc, f"worker {self.address}") from None
            reason = exc.details() or exc.code().name
            log(logger, "KV over CUDA IPC refused; pushing it over gRPC", logging.WARNING,
                request_id=self.request_id, decode=self.address, reason=reason)
            if self.on_refused:
                self.on_refused(self.address, reason)
            self.path = "grpc"
            return self.fallback()
        finally:
            self._drop()


# ---------------------------------------------------------------------------------------------- receiver


class IpcReceiver:
    """The decode side: whether this worker takes shared KV, and the copy of one push into its own memory."""

    def __init__(self, device: torch.device, kv_path: str = "auto") -> None:
        self.device = torch.device(device)
        self.kv_path = check_kv_path(kv_path, self.device)
        if kv_path == "grpc":
            self.refusal = "this decode worker takes KV over gRPC only (kv_path grpc)"
        elif self.device.type != "cuda":
            self.refusal = f"this decode worker's model is on {self.device.type}, not CUDA"
        else:
            self.refusal = ""
        self._streams: dict[int, torch.cuda.Stream] = {}
        self._lock = threading.Lock()
        if not self.refusal:
            torch.cuda.init()  # opening a handle needs this process's CUDA allocator up

    def check(self, h: pb.KVSharedHeader) -> int:
        """The local index of the sender's GPU; IpcRefused when this worker cannot open its memory."""
        if self.refusal:
            raise IpcRefused(self.refusal)
        if h.host_id != host_id():
            raise IpcRefused("the prefill worker runs on another machine (CUDA IPC works within one)")
        if h.pid == os.getpid():
            raise IpcRefused("the prefill worker is this same process (CUDA IPC handles open in another one)")
        src = local_device(h.device_uuid)
        dst = self.device.index if self.device.index is not None else torch.cuda.current_device()
        if src != dst:
            # Across two H200s the decode worker died (SIGSEGV) in its copy stream's wait on the event opened
            # on the other GPU (docs/gpu.md); until that is understood, only same-GPU pairs share memory.
            raise IpcRefused(f"the KV is on GPU {h.device_uuid}, not this decode worker's GPU "
                             f"{device_uuid(dst)} (CUDA IPC is used within one GPU)")
        return src

    def stream(self) -> torch.cuda.Stream:
        with self._lock:
            dev = self.device.index if self.device.index is not None else torch.cuda.current_device()
            if dev not in self._streams:
                self._streams[dev] = torch.cuda.Stream(dev)
            return self._streams[dev]

    def open(self, h: pb.KVSharedHeader, spec: KVSpec, src: int) -> SharedCopy:
        return SharedCopy(self, h, spec, src)


class SharedCopy:
    """One PushShared on the receiver: opens the sender's K and V storages, copies each announced layer on
    its own stream after the layer's event, and hands over per-layer (K, V) in this worker's memory.
    `close()` (always) waits for the copies and only then drops the sender's memory."""

    def __init__(self, rx: IpcReceiver, h: pb.KVSharedHeader, spec: KVSpec, src: int) -> None:
        self.spec, self.src, self.generation = spec, src, h.generation
        self.stream = rx.stream()
        self.dtype = DTYPES[spec.dtype]
        self._events: list[Any] = []
        self._next = 0
        self.received = 0
        self._k = self._v = None
        with torch.cuda.stream(self.stream):  # torch's share event (if any) is waited on by this stream
            opened = []
            try:
                for which in (h.k, h.v):
                    opened.append(open_shared(which, src))
            except Exception as exc:  # noqa: BLE001 - CUDA's reason, whatever its type
                for which in (h.k, h.v)[len(opened):]:
                    unshare(which)  # settled here; what did open is settled when `opened` is dropped
                opened.clear()
                raise IpcRefused(f"cannot open the CUDA IPC handle: {exc}") from None
            self._k, self._v = opened
            self.dst = torch.empty((2, spec.n_layers, *spec.shape), dtype=self.dtype, device=rx.device)

    def _view(self, storage: torch.UntypedStorage, offset: int, which: str) -> torch.Tensor:
        nbytes, item = self.spec.tensor_bytes, self.dtype.itemsize
        if offset % item or offset + nbytes > storage.nbytes():
            raise InvalidArgument(f"shared KV layer {self._next} {which}: {nbytes} bytes at offset {offset} do not "
                                  f"fit the shared storage of {storage.nbytes()} bytes", param="offset")
        t = torch.empty(0, dtype=self.dtype, device=storage.device)
        n, heads, dim = self.spec.shape
        return t.set_(storage, offset // item, (n, heads, dim), (heads * dim, dim, 1))

    def layer(self, m: pb.KVSharedLayer) -> None:
        if m.generation != self.generation:
            raise InvalidArgument(f"shared KV layer {m.layer}: generation {m.generation} is not this push's "
                                  f"{self.generation}", param="generation")
        if m.layer != self._next:
            raise InvalidArgument(f"shared KV layer {m.layer} out of order: expected layer {self._next}"
                                  if self._next < self.spec.n_layers else
                                  f"shared KV layer {m.layer} after the last layer", param="layer")
        k, v = self._view(self._k, m.k_offset, "K"), self._view(self._v, m.v_offset, "V")
        with torch.cuda.stream(self.stream):
            if m.event_handle:
                try:
                    ev = torch.cuda.Event.from_ipc_handle(self.src, m.event_handle)
                except Exception as exc:  # noqa: BLE001
                    raise IpcRefused(f"cannot open the CUDA IPC event of layer {m.layer}: {exc}") from None
                self.stream.wait_event(ev)
                self._events.append(ev)
            self.dst[0, m.layer].copy_(k, non_blocking=True)
            self.dst[1, m.layer].copy_(v, non_blocking=True)
        self._next += 1
        self.received += 2 * self.spec.tensor_bytes

    def finish(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Every layer's (K, V) in this worker's memory, copies complete; InvalidArgument when the push ended early."""
        if self._next != self.spec.n_layers:
            raise InvalidArgument(f"shared KV push ended early: {self._next} of {self.spec.n_layers} layers",
                                  param="layer")
        self.stream.synchronize()
        # Allocated on the copy stream, used and freed on the decode scheduler's stream from here on.
        self.dst.record_stream(torch.cuda.current_stream(self.dst.device))
        return [(self.dst[0, i], self.dst[1, i]) for i in range(self.spec.n_layers)]

    def close(self) -> None:
        """Wait for every queued copy, then drop the sender's memory (torch's counter tells the sender)."""
        self.stream.synchronize()
        with torch.cuda.stream(self.stream):  # the storages' deleter synchronizes the current stream: this one
            self._k = self._v = None
        self._events = []
