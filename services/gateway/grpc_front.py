"""The gRPC `tandem.v1.Generation` front door: same validation and path as HTTP, statuses instead of JSON."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterator

import grpc

from services.contracts.errors import InvalidArgument
from services.engine.sampling import SamplingParams
from services.gateway.core import Chunk, Gateway, GenRequest
from services.gateway.openai_api import MAX_STOP, check_model
from services.grpcutil import REQUEST_ID_KEY, get_logger, request_id, rpc_errors
from services.rpc.tandem.v1 import generation_pb2 as pb
from services.rpc.tandem.v1 import generation_pb2_grpc as pb_grpc

logger = get_logger("tandem.gateway.grpc")
SERVICE_NAME = "tandem.v1.Generation"
_FINISH = {"stop": pb.FINISH_REASON_STOP, "length": pb.FINISH_REASON_LENGTH}


def sampling_params(s: pb.SamplingOptions) -> SamplingParams:
    if len(s.stop) > MAX_STOP:
        raise InvalidArgument(f"sampling.stop: at most {MAX_STOP} stop strings (got {len(s.stop)})", param="stop")
    for name in ("temperature", "top_p"):
        if s.HasField(name) and not math.isfinite(getattr(s, name)):
            raise InvalidArgument(f"sampling.{name}: must be finite", param=name)
    return SamplingParams(max_tokens=s.max_tokens if s.HasField("max_tokens") else 16,
                          temperature=s.temperature if s.HasField("temperature") else 1.0,
                          top_k=s.top_k, top_p=s.top_p if s.HasField("top_p") else 1.0,
                          seed=s.seed if s.HasField("seed") else None, stop=tuple(s.stop),
                          ignore_eos=s.ignore_eos)


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
        check_model(self.gw, request.model)
        kind = request.WhichOneof("input")
        tok = self.gw.tokenizer
        if kind == "text":
            if not request.text:
                raise InvalidArgument("text: must not be empty", param="text")
            ids, param = tok.encode(request.text), "text"
        elif kind == "token_ids":
            ids, param = list(request.token_ids.ids), "token_ids"
        elif kind == "chat":
            if not request.chat.messages:
                raise InvalidArgument("chat.messages: must not be empty", param="chat")
            ids, param = tok.encode_chat([{"role": m.role, "content": m.content} for m in request.chat.messages]), "chat"
        else:
            raise InvalidArgument("input: set one of text, token_ids or chat", param="input")
        params = sampling_params(request.sampling)
        self.gw.check(ids, params, prompt_param=param)
        if request.timeout_s < 0 or not math.isfinite(request.timeout_s):
            raise InvalidArgument(f"timeout_s: must be >= 0 (got {request.timeout_s})", param="timeout_s")
        timeout = request.timeout_s or self.gw.default_timeout_s
        remaining = context.time_remaining()
        if remaining is not None:
            timeout = min(timeout, remaining)
        return GenRequest(ids, params, request_id=rid, timeout_s=timeout, api="grpc", received=received)

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


def add_to_server(gw: Gateway) -> object:
    servicer = GenerationServicer(gw)
    return lambda server: pb_grpc.add_GenerationServicer_to_server(servicer, server)
