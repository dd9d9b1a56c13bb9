"""The OpenAI-compatible HTTP API (FastAPI): models, completions, chat completions, SSE, health, metrics."""

from __future__ import annotations

import asyncio
import json
import math
import threading
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from services.contracts.errors import NotFound, TandemError
from services.gateway import openai_api as oa
from services.gateway.admission import RETRY_AFTER_S, Ticket
from services.gateway.core import Chunk, Gateway, GenRequest, new_request_id
from services.gateway.edge import ApiKeys, EdgeMiddleware
from services.gateway.schema import MAX_BODY_BYTES, openapi_body
from services.grpcutil import REQUEST_ID_KEY, get_logger, log

logger = get_logger("tandem.gateway.http")
TIMEOUT_HEADER = "x-tandem-timeout-s"  # optional per-request deadline in seconds
_END = object()


def _error(status: int, message: str, type_: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    return JSONResponse(oa.error_body(message, type_, param, code), status_code=status)


def tandem_error_response(exc: TandemError) -> JSONResponse:
    code = getattr(exc, "openai_code", None) or exc.code.lower()
    resp = _error(exc.http_status, exc.message, exc.openai_type, exc.param, code)
    retry = getattr(exc, "retry_after_s", None)
    if retry is not None or exc.http_status == 503:
        resp.headers["retry-after"] = str(max(1, math.ceil(retry or RETRY_AFTER_S)))
    return resp


async def relay(gw: Gateway, req: GenRequest, pool: ThreadPoolExecutor,
                ticket: Ticket | None = None) -> AsyncIterator[Chunk]:
    """Drive Gateway.run on a worker thread; leaving this iterator early (disconnect) cancels upstream.
    The admission `ticket` is given back when the run ends, however it ends."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    cancel = threading.Event()

    def put(item: Any) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # the event loop is gone (shutdown); nobody is listening
            cancel.set()

    def produce() -> None:
        try:
            for chunk in gw.run(req, cancel):
                put(chunk)
        except BaseException as exc:  # noqa: BLE001 - handed to the async side, which raises it
            put(exc)
        finally:
            if ticket is not None:
                ticket.release()
            put(_END)

    pool.submit(produce)
    try:
        while True:
            item = await queue.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        cancel.set()


def started_pool(n: int) -> ThreadPoolExecutor:
    """A pool whose `n` threads already run: ThreadPoolExecutor starts threads on demand, in submit(), which
    waits for the new thread to be scheduled; on the event loop, under a burst of admissions on a busy machine,
    that wait would delay every request behind it (refusals included)."""
    pool = ThreadPoolExecutor(max_workers=n, thread_name_prefix="gateway")
    all_up = threading.Barrier(n + 1)
    for _ in range(n):
        pool.submit(all_up.wait)
    all_up.wait()
    return pool


class AdmissionMiddleware:
    """The door, outermost, so a refusal costs no routing, body read or tokenization: a generation request
    either takes an admission ticket (left in request.state for the handler) or gets 429 / 503 at once."""

    PATHS = ("/v1/completions", "/v1/chat/completions")

    def __init__(self, app: Any, gw: Gateway) -> None:
        self.app, self.gw = app, gw

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in self.PATHS:
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        try:
            ticket = self.gw.admit()
        except TandemError as exc:
            reason = "draining" if self.gw.admission.draining else "full"
            self.gw.metrics.refused.labels(reason).inc()
            try:
                await tandem_error_response(exc)(scope, receive, send)
            finally:  # the door's own time: ASGI entry to the refusal handed to the socket
                self.gw.metrics.refusal_seconds.labels(reason).observe(time.perf_counter() - start)
            return
        state = scope.setdefault("state", {})
        state["ticket"] = ticket
        try:
            await self.app(scope, receive, send)
        finally:
            if not state.get("ticket_owned"):  # the handler never ran (a failure before it)
                ticket.release()


class RequestIdMiddleware:
    """Take `x-request-id` from the request (or make one), keep it in request.state, echo it in the response.

    Plain ASGI rather than @app.middleware("http"), which wraps `receive` and hides client disconnects.
    """

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        key = REQUEST_ID_KEY.encode()
        rid = next((v.decode("latin-1") for k, v in scope.get("headers", ()) if k == key), "") or new_request_id()
        scope.setdefault("state", {})["request_id"] = rid

        async def send_with_id(message: dict) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (key, rid.encode("latin-1"))]
            await send(message)

        await self.app(scope, receive, send_with_id)


def create_app(gw: Gateway, pool: ThreadPoolExecutor | None = None, keys: ApiKeys | None = None,
               max_body: int = MAX_BODY_BYTES) -> FastAPI:
    app = FastAPI(title="Tandem gateway", version="1")
    app.add_middleware(AdmissionMiddleware, gw=gw)  # the door: before routing, body and tokenization
    app.add_middleware(EdgeMiddleware, keys=keys, max_body=max_body)  # auth and body size before a slot is taken
    app.add_middleware(RequestIdMiddleware)  # added last = outermost: even a refusal carries x-request-id
    # one thread per admitted request: the admission bound, not this pool, is what queues are measured by
    pool = pool or started_pool(gw.admission.limit + 8)
    app.state.gateway, app.state.pool = gw, pool

    @app.exception_handler(TandemError)
    async def on_tandem(request: Request, exc: TandemError) -> JSONResponse:
        return tandem_error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def on_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = (exc.errors() or [{}])[0]
        param = ".".join(str(x) for x in first.get("loc", ())[1:]) or None
        return _error(400, f"{param or 'body'}: {first.get('msg', 'invalid request')}", "invalid_request_error", param)

    @app.exception_handler(StarletteHTTPException)
    async def on_http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail), "invalid_request_error" if exc.status_code < 500 else
                      "server_error", None, "not_found" if exc.status_code == 404 else None)

    @app.exception_handler(Exception)
    async def on_internal(request: Request, exc: Exception) -> JSONResponse:
        log(logger, f"internal error: {exc!r}", 40, request_id=getattr(request.state, "request_id", None))
        return _error(500, f"internal error: {type(exc).__name__}: {exc}", "server_error")

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [_model_card(gw)] + ([gw.dlm.model_card()] if gw.dlm else [])}

    @app.get("/v1/models/{model_id}")
    async def model(model_id: str) -> dict[str, Any]:
        if gw.dlm is not None and gw.dlm.serves(model_id):
            return gw.dlm.model_card()
        oa.check_model(gw, model_id, NotFound)
        return _model_card(gw)

    @app.post("/v1/completions", openapi_extra=openapi_body(oa.CompletionBody))
    async def completions(request: Request) -> Response:
        return await _generate(request, "completions")

    @app.post("/v1/chat/completions", openapi_extra=openapi_body(oa.ChatBody))
    async def chat(request: Request) -> Response:
        return await _generate(request, "chat")

    @app.get("/health")
    async def health() -> JSONResponse:
        if gw.admission.draining:  # no worker polls while shutting down
            return JSONResponse({"status": "draining", "model": gw.model_name}, status_code=503)
        doc = await run_in_threadpool(gw.health)
        return JSONResponse(doc, status_code=200 if doc["status"] == "ok" else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(gw.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    async def _generate(request: Request, kind: Literal["completions", "chat"]) -> Response:
        received = time.perf_counter()
        ticket = request.state.ticket  # taken at the door (AdmissionMiddleware); from here on we give it back
        request.state.ticket_owned = True
        try:
            return await _admitted(request, kind, received, ticket)
        finally:
            if not ticket.handed_over:  # answered (or failed) before a run took it: a 400, say
                ticket.release()

    async def _admitted(request: Request, kind: Literal["completions", "chat"], received: float,
                        ticket: Ticket) -> Response:
        rid = request.state.request_id
        raw = await request.body()
        try:
            data = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            return _error(400, f"body: not valid JSON ({exc})", "invalid_request_error", "body", "invalid_json")
        except RecursionError:
            return _error(400, "body: JSON nested too deeply", "invalid_request_error", "body", "invalid_json")
        dlm = gw.dlm is not None and isinstance(data, dict) and gw.dlm.serves(data.get("model"))
        body = oa.parse(data, kind, _dlm_fields() if dlm else ())
        timeout = _timeout(request, gw.default_timeout_s)
        model_name = gw.model_name
        if gw.dlm is not None and gw.dlm.serves(body.model):  # the diffusion LM: its own worker pool
            req = gw.dlm.to_request(kind, body, data, rid, timeout, received)
            model_name = gw.dlm.model_name
        else:
            req = await run_in_threadpool(oa.to_request, gw, body, rid, timeout, received)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        shaper = oa.Shaper(kind, model_name, rid, include_usage)
        ticket.handed_over = True  # the run gives it back when it ends, however it ends
        if not body.stream:
            collected = await _collect_unless_disconnected(request, gw, req, pool, ticket)
            if collected is None:  # the client left; upstream is cancelled, nobody reads an answer
                return Response(status_code=499)
            return JSONResponse(shaper.whole(collected))
        chunks = relay(gw, req, pool, ticket)
        # Pull the first token before answering 200, so routing/prefill errors get a real status code.
        first = await chunks.__anext__()
        return StreamingResponse(_sse(shaper, first, chunks, rid), media_type="text/event-stream",
                                 headers={"cache-control": "no-cache"})

    return app


async def _collect_unless_disconnected(request: Request, gw: Gateway, req: GenRequest, pool: ThreadPoolExecutor,
                                       ticket: Ticket) -> list[Chunk] | None:
    """All chunks of a non-streaming request; None (upstream cancelled) if the client disconnects first.

    The whole run stays on its thread and comes back once: no event-loop wake-up per token, so the loop
    stays free to answer the door (429s) quickly under load.
    """
    cancel = threading.Event()

    def run() -> list[Chunk]:
        try:
            return list(gw.run(req, cancel))
        finally:
            ticket.release()

    async def watch() -> None:
        while not await request.is_disconnected():
            await asyncio.sleep(0.25)

    work = asyncio.get_running_loop().run_in_executor(pool, run)
    watcher = asyncio.ensure_future(watch())
    try:
        done, _ = await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if work in done:
            return work.result()
        cancel.set()  # the run ends at its next token and frees the decode slot and KV
        await asyncio.gather(work, return_exceptions=True)
        return None
    finally:
        watcher.cancel()
        cancel.set()


async def _sse(shaper: oa.Shaper, first: Chunk, rest: AsyncIterator[Chunk], rid: str) -> AsyncIterator[bytes]:
    try:
        chunk, is_first = first, True
        while True:
            for doc in shaper.stream_chunks(chunk, is_first):
                yield b"data: " + json.dumps(doc).encode() + b"\n\n"
            if chunk.finish_reason is not None:
                break
            is_first = False
            chunk = await rest.__anext__()
    except TandemError as exc:  # mid-stream failure: the status line is gone, so say it in the stream
        code = getattr(exc, "openai_code", None) or exc.code.lower()
        yield b"data: " + json.dumps(oa.error_body(exc.message, exc.openai_type, exc.param, code)).encode() + b"\n\n"
    except StopAsyncIteration:
        pass
    finally:
        await rest.aclose()  # on client disconnect this cancels the upstream decode stream
    yield b"data: [DONE]\n\n"


def _timeout(request: Request, default: float) -> float:
    raw = request.headers.get(TIMEOUT_HEADER)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 < value <= 3600:
        from services.contracts.errors import InvalidArgument

        raise InvalidArgument(f"{TIMEOUT_HEADER}: must be a number of seconds in (0, 3600] (got {raw!r})",
                              param=TIMEOUT_HEADER)
    return value


def _dlm_fields() -> tuple[str, ...]:
    from services.dlm.protocol import OPTION_FIELDS

    return OPTION_FIELDS


def _model_card(gw: Gateway) -> dict[str, Any]:
    return {"id": gw.model_name, "object": "model", "created": 0, "owned_by": "tandem"}
