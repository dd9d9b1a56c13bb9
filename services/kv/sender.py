"""The prefill side of a KV push: one client stream per request, fed layer by layer from a queue."""

from __future__ import annotations

import queue
import threading
import time
from typing import Any

import grpc
import torch

from services.grpcutil import REQUEST_ID_KEY, channel, error_from_rpc
from services.kv.proto import layer_piece_bytes
from services.kv.wire import DEFAULT_CHUNK, KVSpec
from services.rpc.tandem.v1 import worker_pb2 as pb

_DONE = object()
PUSH = "/tandem.v1.KVTransfer/Push"
PUSH_SHARED = "/tandem.v1.KVTransfer/PushShared"
KV_TIMEOUT_S = 30.0  # a push's time limit once its KV is ready, plus KV_TIMEOUT_PER_TOKEN_S per prompt token
KV_TIMEOUT_PER_TOKEN_S = 0.002
# The receiver's allowance for silence between two pieces grows faster: each layer arrives after its own forward
# pass, and a layer of an 8k-token prompt takes seconds on a free CPU core, tens of seconds on a busy one.
KV_STALL_PER_TOKEN_S = 0.01


def push_timeout(n_tokens: int, base_s: float = KV_TIMEOUT_S) -> float:
    """Seconds a push of `n_tokens` may take after its last layer is computed (scaled with the prompt)."""
    return base_s + KV_TIMEOUT_PER_TOKEN_S * n_tokens


class Channels:
    """One gRPC channel per decode address, reused across pushes (connection setup stays off the hot path)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._channels: dict[str, grpc.Channel] = {}
        self._calls: dict[tuple[str, str], grpc.StreamUnaryMultiCallable] = {}

    def _call(self, address: str, method: str, serializer: Any) -> grpc.StreamUnaryMultiCallable:
        with self._lock:
            if (address, method) not in self._calls:
                if address not in self._channels:
                    self._channels[address] = channel(address)
                self._calls[(address, method)] = self._channels[address].stream_unary(
                    method, request_serializer=serializer, response_deserializer=pb.KVReceipt.FromString)
            return self._calls[(address, method)]

    def push(self, address: str) -> grpc.StreamUnaryMultiCallable:
        """KVTransfer.Push taking requests already serialized (kvwire's wire-form pieces)."""
        return self._call(address, PUSH, None)

    def push_shared(self, address: str) -> grpc.StreamUnaryMultiCallable:
        """KVTransfer.PushShared (CUDA IPC handles, services.kv.ipc)."""
        return self._call(address, PUSH_SHARED, pb.KVSharedChunk.SerializeToString)

    def close(self) -> None:
        with self._lock:
            for ch in self._channels.values():
                ch.close()
            self._channels.clear()
            self._calls.clear()


class KVSender:
    """Streams one request's KV to `address` while the caller is still computing later layers.

    `put(layer, k, v)` in layer order from the compute thread; `close()` after the last layer; `wait()` for the
    receipt. gRPC's own thread pulls the pieces (and does the serialization), so compute is never blocked.

    `timeout_s` bounds the push from the moment its KV is complete (`close()`), not from the header: the
    forward pass of a long prompt may take minutes on CPU. `call_timeout_s` (the request's own deadline) is the
    backstop on the whole call.
    """

    path = "grpc"  # PrefillResponse.kv_path

    def __init__(self, stubs: Channels, address: str, spec: KVSpec, request_id: str, timeout_s: float,
                 lease_s: float = 0.0, chunk_bytes: int = DEFAULT_CHUNK, call_timeout_s: float | None = None) -> None:
        self.address, self.spec, self.request_id = address, spec, request_id
        self.chunk_bytes, self.timeout_s = chunk_bytes, timeout_s
        self._q: queue.Queue = queue.Queue()
        self._header = spec.header(request_id, lease_s).SerializeToString()
        self.started = time.perf_counter()
        self.first_piece_at = 0.0
        self.ready_at = 0.0  # when the last layer was handed over: the KV timeout starts here
        self._future = stubs.push(address).future(self._chunks(), timeout=call_timeout_s,
                                                  metadata=((REQUEST_ID_KEY, request_id),))

    def _chunks(self):
        yield self._header
        while True:
            try:
                item = self._q.get(timeout=0.25)
            except queue.Empty:
                if self._future_done():
                    return  # the call ended (deadline, cancel, rejection): stop feeding it
                continue
            if item is _DONE:
                return
            layer, k, v, ready = item
            if ready is not None:
                ready.synchronize()  # the device->host copy of this layer has landed (CUDA event)
            if not self.first_piece_at:
                self.first_piece_at = time.perf_counter()
            yield from layer_piece_bytes(layer, k, v, self.chunk_bytes)

    def _future_done(self) -> bool:
        fut = getattr(self, "_future", None)
        return fut is not None and fut.done()

    def put(self, layer: int, k: torch.Tensor, v: torch.Tensor, ready: Any = None) -> None:
        """Queue a layer; `ready` (a CUDA event, or None) fires once k and v hold their bytes."""
        self._q.put((layer, k, v, ready))

    def close(self) -> None:
        self.ready_at = time.perf_counter()
        self._q.put(_DONE)

    def cancel(self) -> None:
        """Abandon the push (the receiver frees what it got)."""
        self._future.cancel()
        self._q.put(_DONE)

    def wait(self) -> pb.KVReceipt:
        """The receipt; the failure as a services.contracts.errors exception (naming the decode worker)."""
        try:
            return receipt_within(self._future, self.timeout_s, self.ready_at, f"KV push to {self.address}",
                                  self.spec.n_tokens)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc, f"worker {self.address}") from None
        except grpc.FutureCancelledError:
            from services.contracts.errors import Unavailable

            raise Unavailable(f"KV push to {self.address} was cancelled") from None


def receipt_within(future: Any, timeout_s: float, ready_at: float | None, what: str, n_tokens: int) -> pb.KVReceipt:
    """A push's receipt, waited for until `timeout_s` after the KV was ready (`ready_at`; None: from now);
    past it the push is cancelled and DeadlineExceeded names `what`. RPC failures propagate to the caller."""
    from services.contracts.errors import DeadlineExceeded

    left = timeout_s - (time.perf_counter() - (ready_at or time.perf_counter()))
    try:
        return future.result(timeout=max(0.0, left))
    except grpc.FutureTimeoutError:
        future.cancel()
        raise DeadlineExceeded(f"{what} did not finish within {timeout_s:.1f}s of the KV being ready "
                               f"({n_tokens} tokens)") from None
