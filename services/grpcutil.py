"""Plumbing every gRPC service shares: health, reflection, error -> status mapping, request ids, deadlines, logs."""

from __future__ import annotations

import functools
import inspect
import json
import logging
import math
import re
import sys
import time
import uuid
from collections.abc import Callable, Iterable
from concurrent import futures
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from services import reflection_v1, tls
from services.contracts import errors
from services.contracts.errors import TandemError

MAX_MESSAGE_BYTES = 8 * 1024 * 1024  # KV chunks are <= 4 MiB; leave room for headers
CHANNEL_OPTIONS = [("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                   ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)]
REQUEST_ID_KEY = "x-request-id"

_STATUS = {name: getattr(grpc.StatusCode, name) for name in (
    "INVALID_ARGUMENT", "NOT_FOUND", "RESOURCE_EXHAUSTED", "UNAVAILABLE", "DEADLINE_EXCEEDED", "INTERNAL",
    "CANCELLED", "FAILED_PRECONDITION", "UNAUTHENTICATED")}


def status_code(exc: TandemError) -> grpc.StatusCode:
    return _STATUS.get(exc.code, grpc.StatusCode.INTERNAL)


_FROM_STATUS: dict[grpc.StatusCode, type[errors.TandemError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: errors.InvalidArgument,
    grpc.StatusCode.FAILED_PRECONDITION: errors.InvalidArgument,
    grpc.StatusCode.OUT_OF_RANGE: errors.InvalidArgument,
    grpc.StatusCode.NOT_FOUND: errors.NotFound,
    grpc.StatusCode.RESOURCE_EXHAUSTED: errors.ResourceExhausted,
    grpc.StatusCode.UNAVAILABLE: errors.Unavailable,
    grpc.StatusCode.CANCELLED: errors.Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: errors.DeadlineExceeded,
    grpc.StatusCode.UNAUTHENTICATED: errors.Unauthenticated,
}
_FIELD = re.compile(r"^([a-z_][a-z0-9_.]*): ")  # our servers start a rejection with the field it names


def error_from_rpc(exc: grpc.RpcError, peer: str) -> errors.TandemError:
    """The services.contracts.errors exception for a failed call to `peer` (e.g. "worker 127.0.0.1:50061").

    The server's message is kept verbatim; for INVALID_ARGUMENT its leading field name becomes `param`.
    """
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    detail = (exc.details() if hasattr(exc, "details") else str(exc)) or ""
    kind = _FROM_STATUS.get(code, errors.TandemError)
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
        detail = f"{peer} unavailable: {detail}"
    m = _FIELD.match(detail) if kind is errors.InvalidArgument else None
    err = kind(detail or f"{code.name} from {peer}", param=m.group(1) if m else None)
    if kind is errors.TandemError:
        err.message = f"{peer}: {code.name}: {detail}"
    return err


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc = {"ts": round(record.created, 3), "level": record.levelname, "logger": record.name, "msg": record.getMessage()}
        doc.update(getattr(record, "fields", {}))
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str)


def get_logger(name: str) -> logging.Logger:
    """A logger writing one JSON object per line to stderr; pass fields with `extra={"fields": {...}}`."""
    logger = logging.getLogger(name)
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_JsonFormatter())
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    return logger


def log(logger: logging.Logger, msg: str, level: int = logging.INFO, **fields: Any) -> None:
    logger.log(level, msg, extra={"fields": fields})


def request_id(context: grpc.ServicerContext) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == REQUEST_ID_KEY:
            return value
    return uuid.uuid4().hex[:16]


def rpc_errors(logger: logging.Logger) -> Callable:
    """Decorate a servicer method (unary or streaming): TandemError -> its status; anything else -> INTERNAL."""

    def wrap(fn: Callable) -> Callable:
        def fail(context: grpc.ServicerContext, exc: Exception, method: str) -> None:
            rid = request_id(context)
            if isinstance(exc, TandemError):
                log(logger, exc.message, logging.WARNING, method=method, request_id=rid, code=exc.code)
                retry = getattr(exc, "retry_after_s", None)
                if retry is not None:  # the retry hint of a full queue, as HTTP's Retry-After is
                    context.set_trailing_metadata((("retry-after", str(max(1, math.ceil(retry)))),))
                context.abort(status_code(exc), exc.message)
            log(logger, f"internal error: {exc!r}", logging.ERROR, method=method, request_id=rid)
            context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}")

        if inspect.isgeneratorfunction(fn):
            @functools.wraps(fn)
            def stream(self: Any, request: Any, context: grpc.ServicerContext) -> Iterable:
                try:
                    yield from fn(self, request, context)
                except Exception as exc:  # noqa: BLE001 - mapped to a status below
                    if isinstance(exc, grpc.RpcError) and not isinstance(exc, TandemError):
                        raise
                    fail(context, exc, fn.__name__)
            return stream

        @functools.wraps(fn)
        def unary(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
            try:
                return fn(self, request, context)
            except Exception as exc:  # noqa: BLE001
                if isinstance(exc, grpc.RpcError) and not isinstance(exc, TandemError):
                    raise
                fail(context, exc, fn.__name__)
        return unary

    return wrap


class Server:
    """A gRPC server with health (NOT_SERVING until `ready()`), reflection and generous message limits."""

    def __init__(self, address: str, add_fns: Iterable[Callable[[grpc.Server], None]], service_names: Iterable[str],
                 max_workers: int = 32, *, interceptors: Iterable[grpc.ServerInterceptor] = (),
                 max_receive_bytes: int = MAX_MESSAGE_BYTES, client_certs: bool = True) -> None:
        """With TANDEM_TLS_* set (services.tls) it listens with TLS, demanding client certificates unless
        `client_certs` is False (a public front door)."""
        options = [*CHANNEL_OPTIONS[:1], ("grpc.max_receive_message_length", max_receive_bytes)]
        self.grpc = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers), options=options,
                                interceptors=list(interceptors))
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        for add in add_fns:
            add(self.grpc)
        self.service_names = list(service_names)
        names = [*self.service_names, health.SERVICE_NAME, reflection.SERVICE_NAME, reflection_v1.SERVICE_NAME]
        reflection.enable_server_reflection(names, self.grpc)
        reflection_v1.enable(names, self.grpc)
        files = tls.from_env()
        if files is None:
            self.port = self.grpc.add_insecure_port(address)
        else:
            creds = grpc.ssl_server_credentials([(files.key, files.cert)], root_certificates=files.ca,
                                                require_client_auth=client_certs)
            self.port = self.grpc.add_secure_port(address, creds)
        if self.port == 0:
            raise OSError(f"cannot listen on {address}")
        self.address = f"{address.rsplit(':', 1)[0]}:{self.port}"
        for name in ("", *self.service_names):
            self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)

    def start(self) -> Server:
        self.grpc.start()
        return self

    def ready(self) -> None:
        for name in ("", *self.service_names):
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)

    def stop(self, grace: float = 2.0) -> None:
        self.health.enter_graceful_shutdown()
        self.grpc.stop(grace).wait()

    def wait(self) -> None:
        self.grpc.wait_for_termination()


def channel(address: str) -> grpc.Channel:
    """A channel to another Tandem process: mutual TLS when TANDEM_TLS_* are set (services.tls), else plaintext."""
    files = tls.from_env()
    if files is None:
        return grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
    return grpc.secure_channel(address, grpc.ssl_channel_credentials(files.ca, files.key, files.cert),
                               options=CHANNEL_OPTIONS)


def wait_healthy(address: str, timeout_s: float = 30.0, service: str = "") -> None:
    """Block until `address` reports SERVING; raise TimeoutError naming the address otherwise."""
    deadline = time.monotonic() + timeout_s
    with channel(address) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while True:
            try:
                resp = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=1.0)
                if resp.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{address} not healthy after {timeout_s:.0f}s")
            time.sleep(0.05)
