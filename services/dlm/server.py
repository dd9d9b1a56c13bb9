"""gRPC `tandem.v1.Diffusion/DiffusionGenerate`: streams committed text as denoising commits it; plus the
plain `generate_text` iterator the gateway can call in-process. `serve(port)` backs `tandem serve dlm`."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from services import grpcutil
from services.contracts.errors import InvalidArgument
from services.dlm.checkpoint import CHECKPOINT_DIR, load_pair, sha256
from services.dlm.protocol import MODEL_NAME, OPTION_FIELDS, SERVICE, DLMChunk  # noqa: F401 (MODEL_NAME: what this serves)
from services.dlm.sampler import Options, sample_iter
from services.dlm.tasks import GEN_LEN, encode_prompt
from services.rpc.tandem.v1 import dlm_pb2, dlm_pb2_grpc

# One token per step in blocks of 2: where FreeCache keeps the baseline's accuracy (docs/dlm.md, "Choosing B and s").
SERVED_BLOCKS = {"block": 2, "steps_per_block": 2}
log = grpcutil.get_logger("tandem.dlm")


class DLMEngine:
    """The loaded DLM + guide and the worker's default options; `stream` runs one request."""

    def __init__(self, ckpt_dir: Path = CHECKPOINT_DIR, defaults: Options | None = None, guided: bool = True) -> None:
        torch.set_grad_enabled(False)
        self.dlm, self.guide, self.tok = load_pair(Path(ckpt_dir))
        self.prompt_len = self.dlm.cfg.max_len - GEN_LEN
        self.defaults = defaults or Options(cache="freecache", **SERVED_BLOCKS)
        self.guided = guided
        self.sha256 = sha256(Path(ckpt_dir) / "dlm.pt")

    def options(self, **overrides: object) -> tuple[Options, bool]:
        guided = bool(overrides.pop("guided", self.guided))
        opts = Options(**{f: getattr(self.defaults, f) for f in Options.__slots__})
        for key, value in overrides.items():
            if key not in Options.__slots__:
                raise InvalidArgument(f"{key}: unknown option", param=key)
            if value is not None:
                setattr(opts, key, value)
        opts.validate(self.dlm.cfg.max_len, self.prompt_len)
        return opts, guided

    def stream(self, prompt: str, **overrides: object) -> Iterator[DLMChunk]:
        if not isinstance(prompt, str):
            raise InvalidArgument("prompt: must be a string", param="prompt")
        ids = encode_prompt(self.tok, prompt, self.prompt_len)
        opts, guided = self.options(**overrides)
        sent, text_len = 0, 0
        for x, st in sample_iter(self.dlm, ids, opts, self.tok.mask_id, self.tok.eos_id,
                                 guide=self.guide if guided else None):
            committed = st.commits[-1]
            done = committed == opts.gen_len
            if committed > sent or done:
                text = self.tok.decode(x[0, self.prompt_len:self.prompt_len + committed].tolist())
                sent = committed
                if len(text) > text_len or done:  # EOS padding adds no text: nothing to send until the end
                    yield DLMChunk(text[text_len:], committed, st.steps, st.forward_passes, st.dlm_tokens, done)
                text_len = len(text)


_engine: DLMEngine | None = None
_engine_lock = threading.Lock()


def engine() -> DLMEngine:
    global _engine
    with _engine_lock:
        if _engine is None:
            _engine = DLMEngine()
        return _engine


def generate_text(prompt: str, **opts: object) -> Iterator[str]:
    """In-process generation for the gateway: yields text chunks as they are committed."""
    for chunk in engine().stream(prompt, **opts):
        if chunk.text:
            yield chunk.text


class _DLMMetrics:
    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("tandem_dlm_requests", "DiffusionGenerate calls by outcome", ["code"],
                                registry=self.registry)
        self.latency = Histogram("tandem_dlm_generate_seconds", "DiffusionGenerate latency", registry=self.registry)
        self.forwards = Counter("tandem_dlm_forward_passes", "DLM forward passes", registry=self.registry)
        self.tokens = Counter("tandem_dlm_committed_tokens", "response tokens committed", registry=self.registry)



class DiffusionServicer(dlm_pb2_grpc.DiffusionServicer):
    def __init__(self, eng: DLMEngine, metrics: _DLMMetrics) -> None:
        self.engine, self.metrics = eng, metrics

    @grpcutil.rpc_errors(log)
    def DiffusionGenerate(self, request: dlm_pb2.DiffusionGenerateRequest,
                          context: object) -> Iterator[dlm_pb2.DiffusionGenerateResponse]:
        t0, rid = time.perf_counter(), grpcutil.request_id(context)
        overrides = {f: getattr(request, f) for f in OPTION_FIELDS if request.HasField(f)}
        try:
            chunks = self.engine.stream(request.prompt, **overrides)
            first = next(chunks)  # validation errors surface here, before anything is streamed
        except InvalidArgument:
            self.metrics.requests.labels("INVALID_ARGUMENT").inc()
            raise
        last = first
        for chunk in _chain(first, chunks):
            last = chunk
            if not context.is_active():
                grpcutil.log(log, "client went away", request_id=rid)
                return
            yield dlm_pb2.DiffusionGenerateResponse(
                text=chunk.text, committed_tokens=chunk.committed_tokens, steps=chunk.steps,
                forward_passes=chunk.forward_passes, dlm_tokens=chunk.dlm_tokens, done=chunk.done)
        self.metrics.requests.labels("OK").inc()
        self.metrics.latency.observe(time.perf_counter() - t0)
        self.metrics.forwards.inc(last.forward_passes)
        self.metrics.tokens.inc(last.committed_tokens)
        grpcutil.log(log, "generated", request_id=rid, steps=last.steps, forward_passes=last.forward_passes,
                     seconds=round(time.perf_counter() - t0, 4))


def _chain(first: DLMChunk, rest: Iterator[DLMChunk]) -> Iterator[DLMChunk]:
    yield first
    yield from rest


class DLMServer:
    def __init__(self, server: grpcutil.Server, metrics_port: int | None) -> None:
        self.server, self.address, self.port, self.metrics_port = server, server.address, server.port, metrics_port

    def stop(self) -> None:
        self.server.stop()

    def wait(self) -> None:
        self.server.wait()


def serve(port: int, checkpoint_dir: str | None = None, *, host: str = "0.0.0.0", cache: str = "freecache",
          guided: bool = True, metrics_port: int | None = None, threads: int | None = 1,
          block: bool = True) -> DLMServer:
    """Start the Diffusion service on host:port (0 = any free port); metrics on metrics_port (default
    port + 1000 when port is fixed, none when 0); blocks unless `block=False`."""
    if threads:
        torch.set_num_threads(threads)  # batch-1 forwards of a tiny model: more threads only spin
    defaults = Options(cache=cache, **SERVED_BLOCKS)
    eng = DLMEngine(Path(checkpoint_dir) if checkpoint_dir else CHECKPOINT_DIR, defaults, guided)
    eng.options()  # reject bad defaults before listening
    metrics = _DLMMetrics()
    servicer = DiffusionServicer(eng, metrics)
    server = grpcutil.Server(f"{host}:{port}",
                             [lambda s: dlm_pb2_grpc.add_DiffusionServicer_to_server(servicer, s)], [SERVICE],
                             max_workers=8).start()
    if metrics_port is None and port:
        from services.registry import METRICS_PORT_OFFSET

        metrics_port = port + METRICS_PORT_OFFSET
    if metrics_port is not None:
        from prometheus_client import start_http_server

        start_http_server(metrics_port, registry=metrics.registry)
    server.ready()
    grpcutil.log(log, "dlm serving", address=server.address, cache=cache, guided=guided, sha256=eng.sha256)
    running = DLMServer(server, metrics_port)
    if block:
        running.wait()
    return running
