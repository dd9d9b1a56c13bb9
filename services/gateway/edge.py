"""What guards both front doors before a handler runs: API keys, the request size limit, and a last-resort guard.

API keys come from `TANDEM_API_KEYS` (comma-separated) and/or `TANDEM_API_KEYS_FILE` (one key a line, `#`
comments); none configured = open. HTTP clients send `Authorization: Bearer KEY`; gRPC clients the
`authorization` metadata key with the same value. Health, metrics and reflection stay open.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import grpc

from services.contracts.errors import InvalidArgument
from services.gateway.schema import MAX_BODY_BYTES
from services.grpcutil import get_logger, log

logger = get_logger("tandem.gateway.edge")
KEYS_ENV, KEYS_FILE_ENV = "TANDEM_API_KEYS", "TANDEM_API_KEYS_FILE"
PROTECTED_HTTP = "/v1/"  # every OpenAI route; /health, /metrics, /docs and /openapi.json stay open
PROTECTED_GRPC = "/tandem.v1."  # every Tandem service; grpc.health.v1 and reflection stay open


class ApiKeys:
    """The accepted keys; `refusal(header)` is None when the Authorization value carries one of them."""

    def __init__(self, keys: Iterable[str]) -> None:
        self.keys = [k.encode() for k in keys if k]

    def __bool__(self) -> bool:
        return bool(self.keys)

    @classmethod
    def load(cls, file: str | Path | None = None, env: dict[str, str] | None = None) -> ApiKeys:
        env = os.environ if env is None else env
        keys = [k.strip() for k in env.get(KEYS_ENV, "").split(",")]
        file = file or env.get(KEYS_FILE_ENV)
        if file:
            try:
                text = Path(file).read_text()
            except OSError as exc:
                raise InvalidArgument(f"{KEYS_FILE_ENV}: cannot read {str(file)!r}: {exc.strerror}",
                                      param=KEYS_FILE_ENV) from None
            keys += [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
        return cls(keys)

    def refusal(self, header: str | None) -> str | None:
        if not self.keys:
            return None
        if not header:
            return "missing API key: send 'Authorization: Bearer KEY' (gRPC: 'authorization' metadata)"
        scheme, _, key = header.strip().partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            return "malformed Authorization: expected 'Bearer KEY'"
        given = key.strip().encode()
        ok = False
        for k in self.keys:  # compare with every key, constant time each
            ok |= hmac.compare_digest(given, k)
        return None if ok else "invalid API key"


def _json_response(status: int, message: str, type_: str, param: str | None, code: str | None,
                   extra: list[tuple[bytes, bytes]] = ()) -> tuple[dict, dict]:
    body = json.dumps({"error": {"message": message, "type": type_, "param": param, "code": code}}).encode()
    start = {"type": "http.response.start", "status": status,
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                         *extra]}
    return start, {"type": "http.response.body", "body": body}


class _TooLarge(Exception):
    pass


class EdgeMiddleware:
    """Plain ASGI: API key check, body size limit (413 without reading the rest) and no 500 ever escaping.

    An exception escaping the app would make uvicorn drop the connection; here it becomes a 500 OpenAI error
    (a bug to fix, logged with its type) and the connection stays usable.
    """

    def __init__(self, app: Any, keys: ApiKeys | None = None, max_body: int = MAX_BODY_BYTES) -> None:
        self.app, self.keys, self.max_body = app, keys or ApiKeys(()), max_body

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers", ()))
        started = False

        async def reply(status: int, message: str, type_: str, param: str | None, code: str | None,
                        extra: list[tuple[bytes, bytes]] = ()) -> None:
            for msg in _json_response(status, message, type_, param, code, extra):
                await send(msg)

        if self.keys and scope["path"].startswith(PROTECTED_HTTP):
            why = self.keys.refusal(headers.get(b"authorization", b"").decode("latin-1") or None)
            if why is not None:
                await reply(401, why, "invalid_request_error", None, "invalid_api_key",
                            [(b"www-authenticate", b'Bearer realm="tandem"')])
                return
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            if length.isdigit():
                await reply(413, f"body: {int(length)} bytes is over the limit of {self.max_body} bytes",
                            "invalid_request_error", "body", "request_too_large", [(b"connection", b"close")])
            else:
                await reply(400, "content-length: not a number", "invalid_request_error", "content-length", None)
            return
        received = 0

        async def counted() -> dict:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body:
                    raise _TooLarge
            return message

        async def tracked(message: dict) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counted, tracked)
        except _TooLarge:
            if not started:
                await reply(413, f"body: over the limit of {self.max_body} bytes", "invalid_request_error", "body",
                            "request_too_large", [(b"connection", b"close")])
        except Exception as exc:  # noqa: BLE001 - the last guard; the log names the bug
            log(logger, f"internal error: {exc!r}", logging.ERROR, path=scope.get("path"),
                request_id=scope.get("state", {}).get("request_id"))
            if not started:
                await reply(500, f"internal error: {type(exc).__name__}", "server_error", None, None)


def _deny(why: str) -> Callable:
    def handler(request: Any, context: grpc.ServicerContext) -> Any:
        context.abort(grpc.StatusCode.UNAUTHENTICATED, why)
    return handler


class ApiKeyInterceptor(grpc.ServerInterceptor):
    """UNAUTHENTICATED (with the reason) for tandem.v1 calls without a valid `authorization` metadata value."""

    def __init__(self, keys: ApiKeys) -> None:
        self.keys = keys

    def intercept_service(self, continuation: Callable, details: grpc.HandlerCallDetails) -> Any:
        if not self.keys or not details.method.startswith(PROTECTED_GRPC):
            return continuation(details)
        header = next((v for k, v in details.invocation_metadata or () if k == "authorization"), None)
        why = self.keys.refusal(header if isinstance(header, str) else None)
        if why is None:
            return continuation(details)
        handler = continuation(details)
        if handler is None:
            return None
        deny = _deny(why)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(deny)
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(deny)
        if handler.stream_stream:
            return grpc.stream_stream_rpc_method_handler(deny)
        return grpc.unary_unary_rpc_method_handler(deny)


def is_loopback(host: str) -> bool:
    return host.strip("[]") in ("127.0.0.1", "localhost", "::1") or host.startswith("127.")
