"""Clients of `tandem.v1.Generation` (sync `Client`, asyncio `AsyncClient`): streams, whole answers, retries.

Every call has a deadline (`timeout`, seconds). A call that fails with UNAVAILABLE before its first token is
retried (`Retry`); after the first token it never is, so no text is sent twice. Failures raise the
services.contracts.errors kinds: InvalidArgument (param = the field), Unauthenticated, ResourceExhausted,
Unavailable, DeadlineExceeded.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from typing import Any

import grpc

from services.client.types import (
    DEFAULT_TARGET,
    TLS,
    Completion,
    Delta,
    Message,
    Retry,
    Sampling,
    build_request,
    metadata,
    to_delta,
)
from services.contracts.errors import TandemError, Unauthenticated
from services.grpcutil import CHANNEL_OPTIONS, error_from_rpc
from services.rpc.tandem.v1 import generation_pb2_grpc as pb_grpc

API_KEY_ENV = "TANDEM_API_KEY"
DEFAULT_TIMEOUT_S = 300.0


class _Base:
    def __init__(self, target: str = DEFAULT_TARGET, *, api_key: str | None = None, tls: TLS | bool | None = None,
                 timeout: float = DEFAULT_TIMEOUT_S, retry: Retry | None = None, model: str = "") -> None:
        self.target, self.timeout, self.model = target, timeout, model
        self.api_key = api_key if api_key is not None else os.environ.get(API_KEY_ENV) or None
        self.retry = retry or Retry()
        self.tls = TLS() if tls is True else (tls or None)
        self._options = list(CHANNEL_OPTIONS)
        if self.tls and self.tls.server_name:
            self._options.append(("grpc.ssl_target_name_override", self.tls.server_name))

    def _prepare(self, prompt: str | Sequence[int] | None, messages: Iterable[Message] | None,
                 kw: dict[str, Any]) -> tuple[Any, tuple, float, str]:
        timeout = kw.pop("timeout", None) or self.timeout
        rid = kw.pop("request_id", None) or uuid.uuid4().hex[:16]
        req = build_request(prompt, None if messages is None else list(messages), Sampling(**kw), self.model)
        return req, metadata(self.api_key, rid), timeout, rid

    def _error(self, exc: grpc.RpcError) -> TandemError:
        err = error_from_rpc(exc, f"gateway {self.target}")
        if isinstance(err, Unauthenticated):
            hint = "pass api_key=" if not self.api_key else "check the key"
            err.message = f"gateway {self.target} refused the call: {err.message} ({hint}; env {API_KEY_ENV})"
        return err

    def _retryable(self, exc: grpc.RpcError, got_first: bool, attempt: int, deadline: float, backoff: float) -> bool:
        return (exc.code() == grpc.StatusCode.UNAVAILABLE and not got_first and attempt < self.retry.attempts
                and time.monotonic() + backoff < deadline)


class _Call:
    """What a sync and an async stream share: the request, its metadata and deadline, and `cancel()`."""

    def __init__(self, client: Any, request: Any, md: tuple, timeout: float, request_id: str) -> None:
        self._client, self._request, self._md, self._timeout = client, request, md, timeout
        self.request_id = request_id
        self.attempts = 0
        self._call: Any = None
        self._cancelled = False

    def cancel(self) -> None:
        self._cancelled = True
        if self._call is not None:
            self._call.cancel()


class Stream(_Call):
    """Iterate for Deltas; `cancel()` (from any thread) ends the call on every worker and ends the iteration."""

    def __iter__(self) -> Iterator[Delta]:
        c, deadline = self._client, time.monotonic() + self._timeout
        backoff = c.retry.backoff_s
        while not self._cancelled:
            self.attempts += 1
            got_first = False
            self._call = c._stub.Generate(self._request, timeout=max(0.001, deadline - time.monotonic()),
                                          metadata=self._md)
            try:
                for msg in self._call:
                    got_first = True
                    yield to_delta(msg)
                return
            except grpc.RpcError as exc:
                if self._cancelled:
                    return
                if not c._retryable(exc, got_first, self.attempts, deadline, backoff):
                    raise c._error(exc) from None
            time.sleep(backoff)
            backoff = min(2 * backoff, c.retry.max_backoff_s)

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cancel()


class Client(_Base):
    """Blocking client. `stream(...)` yields Deltas as tokens arrive; `generate(...)` returns one Completion.

    Keyword arguments of both: max_tokens, temperature, top_p, top_k, seed, stop, ignore_eos (the proto's
    SamplingOptions; unset = the gateway's defaults), timeout (seconds, default the client's), request_id.
    """

    def __init__(self, target: str = DEFAULT_TARGET, **kw: Any) -> None:
        super().__init__(target, **kw)
        if self.tls:
            self._channel = grpc.secure_channel(target, self.tls.credentials(), options=self._options)
        else:
            self._channel = grpc.insecure_channel(target, options=self._options)
        self._stub = pb_grpc.GenerationStub(self._channel)

    def stream(self, prompt: str | Sequence[int] | None = None, *, messages: Iterable[Message] | None = None,
               **kw: Any) -> Stream:
        req, md, timeout, rid = self._prepare(prompt, messages, kw)
        return Stream(self, req, md, timeout, rid)

    def generate(self, prompt: str | Sequence[int] | None = None, *, messages: Iterable[Message] | None = None,
                 **kw: Any) -> Completion:
        return Completion.of(list(self.stream(prompt, messages=messages, **kw)))

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncStream(_Call):
    """`async for` Deltas; `cancel()` ends the call."""

    async def __aiter__(self) -> AsyncIterator[Delta]:
        c, deadline = self._client, time.monotonic() + self._timeout
        backoff = c.retry.backoff_s
        while not self._cancelled:
            self.attempts += 1
            got_first = False
            self._call = c._stub.Generate(self._request, timeout=max(0.001, deadline - time.monotonic()),
                                          metadata=self._md)
            try:
                async for msg in self._call:
                    got_first = True
                    yield to_delta(msg)
                return
            except asyncio.CancelledError:
                if self._cancelled:  # grpc.aio reports our own cancel() this way: the stream just ends
                    return
                self.cancel()
                raise
            except grpc.RpcError as exc:
                if self._cancelled or exc.code() == grpc.StatusCode.CANCELLED and self._call.cancelled():
                    return
                if not c._retryable(exc, got_first, self.attempts, deadline, backoff):
                    raise c._error(exc) from None
            await asyncio.sleep(backoff)
            backoff = min(2 * backoff, c.retry.max_backoff_s)


class AsyncClient(_Base):
    """The asyncio twin of Client (grpc.aio): `stream(...)` is an async iterator, `await generate(...)`."""

    def __init__(self, target: str = DEFAULT_TARGET, **kw: Any) -> None:
        super().__init__(target, **kw)
        if self.tls:
            self._channel = grpc.aio.secure_channel(target, self.tls.credentials(), options=self._options)
        else:
            self._channel = grpc.aio.insecure_channel(target, options=self._options)
        self._stub = pb_grpc.GenerationStub(self._channel)

    def stream(self, prompt: str | Sequence[int] | None = None, *, messages: Iterable[Message] | None = None,
               **kw: Any) -> AsyncStream:
        req, md, timeout, rid = self._prepare(prompt, messages, kw)
        return AsyncStream(self, req, md, timeout, rid)

    async def generate(self, prompt: str | Sequence[int] | None = None, *,
                       messages: Iterable[Message] | None = None, **kw: Any) -> Completion:
        return Completion.of([d async for d in self.stream(prompt, messages=messages, **kw)])

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
