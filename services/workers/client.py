"""WorkerClient: one gRPC channel to one worker; statuses come back as services.contracts.errors exceptions."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TypeVar

import grpc

from services.contracts import errors
from services.engine.sampling import SamplingParams
from services.grpcutil import REQUEST_ID_KEY, channel, error_from_rpc
from services.rpc.tandem.v1 import worker_pb2 as pb
from services.rpc.tandem.v1 import worker_pb2_grpc as rpc

T = TypeVar("T")
OnCall = Callable[[Callable[[], object]], None]  # receives the cancel() of a call in flight
NO_TOKEN = -1  # TokenEvent.token_id of a last event that adds no token



@dataclass(slots=True)
class Timings:
    queue_s: float = 0.0
    prefill_s: float = 0.0
    kv_transfer_s: float = 0.0  # the part of the push not hidden behind compute
    first_decode_s: float = 0.0


@dataclass(slots=True)
class PrefillResult:
    request_id: str
    first_token: int
    handle: str
    prompt_tokens: int
    finished: str | None  # "stop"/"length" when the first token ends the request
    timings: Timings = field(default_factory=Timings)
    kv_bytes: int = 0
    kv_path: str = ""  # "grpc" or "ipc": how the KV reached the decode worker ("" when nothing was pushed)


@dataclass(slots=True)
class TokenEvent:
    token_id: int  # NO_TOKEN (-1) only on a last event that adds no token (cancelled by the worker)
    finish_reason: str | None  # set on the last event
    first_decode_s: float | None = None  # on the first event: Decode call -> this token, seconds


@dataclass(slots=True)
class WorkerInfo:
    role: str
    model: str
    fingerprint: str
    address: str
    pending_prompt_tokens: int
    live_requests: int
    waiting_requests: int
    kv_free_bytes: int
    kv_total_bytes: int
    max_seq_len: int = 0
    vocab_size: int = 0
    kv_dtype: str = ""


def sampling_to_pb(p: SamplingParams) -> pb.WorkerSampling:
    p.validate()
    msg = pb.WorkerSampling(max_tokens=p.max_tokens, temperature=p.temperature, top_k=p.top_k, top_p=p.top_p,
                            ignore_eos=p.ignore_eos)
    if p.seed is not None:
        msg.seed = p.seed
    return msg


def sampling_from_pb(m: pb.WorkerSampling) -> SamplingParams:
    """Validated SamplingParams; a bad field raises InvalidArgument naming it."""
    return SamplingParams(max_tokens=m.max_tokens, temperature=m.temperature, top_k=m.top_k, top_p=m.top_p,
                          seed=m.seed if m.HasField("seed") else None, ignore_eos=m.ignore_eos).validate()


def result_from_pb(m: pb.PrefillResponse) -> PrefillResult:
    t = m.timings
    return PrefillResult(request_id=m.request_id, first_token=m.first_token, handle=m.handle,
                         prompt_tokens=m.prompt_tokens, finished=m.finish_reason or None,
                         timings=Timings(queue_s=t.queue_s, prefill_s=t.prefill_s, kv_transfer_s=t.kv_transfer_s),
                         kv_bytes=m.kv_bytes, kv_path=m.kv_path)


def _event(m: pb.DecodeEvent, first: bool) -> TokenEvent:
    token = m.token_id if m.HasField("token_id") else NO_TOKEN
    return TokenEvent(token, m.finish_reason or None, m.first_decode_s if first else None)


class TokenStream:
    """A decode call's events, in order. `cancel()` may come from any thread (a stall watchdog); the reader
    then gets Unavailable. `close()` (or dropping it early) cancels the call, freeing the worker's slot and KV."""

    def __init__(self, call: grpc.Call, convert: Callable, address: str) -> None:
        self._call, self._convert, self.address = call, convert, address
        self._i = 0

    def __iter__(self) -> TokenStream:
        return self

    def __next__(self) -> TokenEvent:
        try:
            m = next(self._call)
        except grpc.RpcError as exc:
            self._call.cancel()
            raise error_from_rpc(exc, f"worker {self.address}") from None
        except StopIteration:
            self._call.cancel()
            raise
        self._i += 1
        return self._convert(m, self._i - 1)

    def cancel(self) -> None:
        self._call.cancel()  # no-op when the call is finished

    close = cancel

    def __del__(self) -> None:
        try:
            self._call.cancel()
        except Exception:  # noqa: BLE001,S110 - interpreter shutdown; nothing left to free
            pass


class WorkerClient:
    """Calls one worker. Every call carries a deadline and the request id as `x-request-id` metadata."""

    def __init__(self, address: str) -> None:
        self.address = address
        self._channel = channel(address)
        self._worker = rpc.WorkerStub(self._channel)
        self._prefill = rpc.PrefillStub(self._channel)
        self._decode = rpc.DecodeStub(self._channel)
        self._kv = rpc.KVTransferStub(self._channel)

    def _call(self, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except grpc.RpcError as exc:
            raise error_from_rpc(exc, f"worker {self.address}") from None

    def info(self, timeout: float = 2.0) -> WorkerInfo:
        m = self._call(lambda: self._worker.Info(pb.WorkerInfoRequest(), timeout=timeout))
        return WorkerInfo(role=m.role, model=m.model, fingerprint=m.fingerprint, address=m.address,
                          pending_prompt_tokens=m.pending_prompt_tokens, live_requests=m.live_requests,
                          waiting_requests=m.waiting_requests, kv_free_bytes=m.kv_free_bytes,
                          kv_total_bytes=m.kv_total_bytes, max_seq_len=m.max_seq_len, vocab_size=m.vocab_size,
                          kv_dtype=m.kv_dtype)

    def prefill(self, request_id: str | None, prompt_ids: list[int], params: SamplingParams, decode_address: str,
                timeout: float, kv_timeout: float = 0.0, on_call: OnCall | None = None) -> PrefillResult:
        """Run the prompt; the prefill worker pushes its KV to `decode_address` itself. `on_call` gets a way to
        cancel the call from another thread (then this raises Unavailable)."""
        rid = request_id or uuid.uuid4().hex[:16]
        req = pb.PrefillRequest(request_id=rid, prompt_ids=prompt_ids, sampling=sampling_to_pb(params),
                                decode_address=decode_address, kv_timeout_s=kv_timeout)
        call = self._call(lambda: self._prefill.Prefill.future(req, timeout=timeout,
                                                                metadata=((REQUEST_ID_KEY, rid),)))
        if on_call is not None:
            on_call(call.cancel)
        try:
            return result_from_pb(call.result())
        except grpc.RpcError as exc:
            raise error_from_rpc(exc, f"worker {self.address}") from None
        except grpc.FutureCancelledError:
            raise errors.Unavailable(f"worker {self.address} unavailable: prefill call cancelled") from None

    def decode(self, request_id: str | None, handle: str, first_token: int, params: SamplingParams,
               timeout: float) -> Iterator[TokenEvent]:
        """Tokens after `first_token`, in order. Closing the iterator cancels the call (frees slot and KV)."""
        rid = request_id or uuid.uuid4().hex[:16]
        req = pb.DecodeRequest(request_id=rid, handle=handle, first_token=first_token, sampling=sampling_to_pb(params))
        call = self._call(lambda: self._decode.Decode(req, timeout=timeout, metadata=((REQUEST_ID_KEY, rid),)))
        return self._stream(call, lambda m, i: _event(m, i == 0))

    def generate(self, request_id: str | None, prompt_ids: list[int], params: SamplingParams,
                 timeout: float, on_call: OnCall | None = None) -> tuple[PrefillResult, Iterator[TokenEvent]]:
        """Mixed worker: the first token (with timings) now, the rest as an iterator. `on_call` as for prefill."""
        rid = request_id or uuid.uuid4().hex[:16]
        req = pb.MixedRequest(request_id=rid, prompt_ids=prompt_ids, sampling=sampling_to_pb(params))
        call = self._call(lambda: self._worker.Generate(req, timeout=timeout, metadata=((REQUEST_ID_KEY, rid),)))
        if on_call is not None:
            on_call(call.cancel)
        try:
            first = next(call)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc, f"worker {self.address}") from None
        except StopIteration:
            raise errors.Unavailable(f"worker {self.address} ended the stream before the first token") from None
        result = result_from_pb(first.prefill)
        if result.finished:
            call.cancel()
            return result, iter(())
        return result, self._stream(call, lambda m, i: _event(m.token, i == 0))

    def release(self, handle: str, timeout: float = 2.0) -> bool:
        """Free a pushed KV that will never be decoded; False if the handle was already gone."""
        return self._call(lambda: self._kv.Release(pb.KVReleaseRequest(handle=handle), timeout=timeout)).released

    def _stream(self, call: grpc.Call, convert: Callable) -> TokenStream:
        return TokenStream(call, convert, self.address)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> WorkerClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
