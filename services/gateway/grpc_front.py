"""The gRPC `tandem.v1.Generation` front door: same validation and path as HTTP, statuses instead of JSON."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterator
from typing import Any, Literal

import grpc

from services.contracts.errors import InvalidArgument
from services.gateway.core import Chunk, Gateway, GenRequest
from services.gateway.openai_api import parse, to_request
from services.grpcutil import REQUEST_ID_KEY, get_logger, request_id, rpc_errors
from services.rpc.tandem.v1 import generation_pb2 as pb
from services.rpc.tandem.v1 import generation_pb2_grpc as pb_grpc

logger = get_logger("tandem.gateway.grpc")
SERVICE_NAME = "tandem.v1.Generation"
DEFAULT_MAX_TOKENS = 16  # proto: "Unset: 16" (for chat too)
MAX_TIMEOUT_S = 3600.0  # as HTTP's x-tandem-timeout-s
_FINISH = {"stop": pb.FINISH_REASON_STOP, "length": pb.FINISH_REASON_LENGTH}


def to_body(request: pb.GenerateRequest) -> tuple[Literal["completions", "chat"], dict[str, Any], dict[str, str]]:
    """The request as the JSON body HTTP would get, its endpoint, and how to name its fields in errors."""
    kind = request.WhichOneof("input")
    body: dict[str, Any] = {"model": request.model}
    names = {f: f"sampling.{f}" for f in ("max_tokens", "temperature", "top_k", "top_p", "seed", "stop", "ignore_eos")}
    if kind == "text":
        body["prompt"], names["prompt"] = request.text, "text"
    elif kind == "token_ids":
        body["prompt"], names["prompt"] = list(request.token_ids.ids), "token_ids"
    elif kind == "chat":
        body["messages"] = [{"role": m.role, "content": m.content} for m in request.chat.messages]
        names["messages"] = "chat.messages"
    else:
        raise InvalidArgument("input: set one of text, token_ids or chat", param="input")
    s = request.sampling
    body["max_tokens"] = s.max_tokens if s.HasField("max_tokens") else DEFAULT_MAX_TOKENS
    for name in ("temperature", "top_p", "seed"):
        if s.HasField(name):
            body[name] = getattr(s, name)
    if s.top_k:
        body["top_k"] = s.top_k
    if s.stop:
        body["stop"] = list(s.stop)
    if s.ignore_eos:
        body["ignore_eos"] = True
    return ("chat" if kind == "chat" else "completions"), body, names


def _renamed(exc: InvalidArgument, names: dict[str, str]) -> InvalidArgument:
    """An error naming an HTTP field, renamed to the proto field the gRPC client set."""
    param = exc.param or ""
    root, dot, rest = param.partition(".")
    if root not in names:
        return exc
    new = names[root] + dot + rest
    message = new + exc.message[len(param):] if exc.message.startswith(param + ":") else exc.message
    err = InvalidArgument(message, param=new)
    err.openai_code = getattr(exc, "openai_code", None)  # type: ignore[attr-defined]
    return err


def to_pb(chunk: Chunk, rid: str) -> pb.GenerateResponse:
    msg = pb.GenerateResponse(request_id=rid, token_ids=chunk.token_ids, text=chunk.text, workers=chunk.workers)
    if chunk.finish_reason is not None:
        msg.finish_reason = _FINISH.get(chunk.finish_reason, pb.FINISH_REASON_UNSPECIFIED)
        msg.usage.CopyFrom(pb.Usage(**chunk.usage))
        t = dict(chunk.timings)
        msg.timings.CopyFrom(pb.Timings(**t))
    return msg


class GenerationServicer(pb_grpc.GenerationServicer):
    def __init__(self, gw: Gateway) -> None:
        self.gw = gw

    def _request(self, request: pb.GenerateRequest, rid: str, context: grpc.ServicerContext,
                 received: float) -> GenRequest:
        if isinstance(request, _Unparsable):
            raise InvalidArgument(f"request: not a valid tandem.v1.GenerateRequest message ({request.why[:200]})",
                                  param="request")
        if not math.isfinite(request.timeout_s) or not 0 <= request.timeout_s <= MAX_TIMEOUT_S:
            raise InvalidArgument(f"timeout_s: must be in [0, {MAX_TIMEOUT_S:.0f}] seconds (got {request.timeout_s})",
                                  param="timeout_s")
        timeout = request.timeout_s or self.gw.default_timeout_s
        remaining = context.time_remaining()
        if remaining is not None:
            timeout = min(timeout, remaining)
        kind, body, names = to_body(request)
        try:  # the same schema and checks as HTTP (services.gateway.schema, openai_api.to_request)
            req = to_request(self.gw, parse(body, kind), rid, timeout, received)
        except InvalidArgument as exc:
            raise _renamed(exc, names) from None
        req.api = "grpc"
        return req

    @rpc_errors(logger)
    def Generate(self, request: pb.GenerateRequest, context: grpc.ServicerContext) -> Iterator[pb.GenerateResponse]:  # noqa: N802
        received = time.perf_counter()
        rid = request_id(context)
        ticket = self.gw.admit()  # RESOURCE_EXHAUSTED (full) / UNAVAILABLE (draining) before any work
        try:
            context.send_initial_metadata(((REQUEST_ID_KEY, rid),))
            req = self._request(request, rid, context, received)
            cancel = threading.Event()
            context.add_callback(cancel.set)  # fires when the call ends for any reason, client cancel included
            for chunk in self.gw.run(req, cancel):
                yield to_pb(chunk, rid)
        finally:
            ticket.release()


class _Unparsable:
    """Stands for request bytes that are not a GenerateRequest (grpc treats a None request as INTERNAL)."""

    def __init__(self, why: str) -> None:
        self.why = why


def _parse_request(data: bytes) -> pb.GenerateRequest | _Unparsable:
    try:
        return pb.GenerateRequest.FromString(data)
    except Exception as exc:  # noqa: BLE001 - protobuf's DecodeError (e.g. a string that is not UTF-8)
        return _Unparsable(str(exc) or type(exc).__name__)


def add_to_server(gw: Gateway) -> object:
    """Registers Generate by hand so a message that does not parse is INVALID_ARGUMENT, not INTERNAL."""
    servicer = GenerationServicer(gw)
    handler = grpc.method_handlers_generic_handler(SERVICE_NAME, {
        "Generate": grpc.unary_stream_rpc_method_handler(
            servicer.Generate, request_deserializer=_parse_request,
            response_serializer=pb.GenerateResponse.SerializeToString)})
    return lambda server: server.add_generic_rpc_handlers((handler,))
