"""The gateway's diffusion-LM path: `/v1/completions` for the dlm model goes to a dlm worker's DiffusionGenerate.

Same contract as the LLM path: errors name the field (400 OpenAI JSON), the request deadline travels as the gRPC
timeout, the request id as `x-request-id` metadata, and a client that leaves cancels the worker's call.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from services.contracts.errors import DeadlineExceeded, InvalidArgument, TandemError, Unavailable
from services.dlm.client import DLMClient
from services.dlm.protocol import MODEL_NAME, OPTION_FIELDS, OPTION_TYPES
from services.gateway.core import Chunk
from services.gateway.metrics import GatewayMetrics
from services.grpcutil import get_logger, log
from services.registry import Registry
from services.router import LeastBusy

logger = get_logger("tandem.gateway.dlm")


@dataclass(slots=True)
class DLMRequest:
    """A validated completions request for the dlm model. `received` is on time.perf_counter()."""

    prompt: str
    options: dict[str, Any]
    request_id: str
    timeout_s: float
    received: float
    max_tokens_as_gen_len: int | None = None  # set when the client's max_tokens became gen_len
    model: str = MODEL_NAME
    api: str = field(default="dlm")


def _reject(name: str, why: str) -> InvalidArgument:
    return InvalidArgument(f"{name}: {why}", param=name)


class DLMPath:
    """Routes dlm-model requests over the registry's `dlm` workers (fewest in flight) and shapes their stream."""

    def __init__(self, registry: Registry, metrics: GatewayMetrics, model_name: str = MODEL_NAME) -> None:
        self.registry, self.metrics, self.model_name = registry, metrics, model_name
        self.router = LeastBusy(registry, "dlm")
        self._clients: dict[str, DLMClient] = {}
        self._lock = threading.Lock()

    def serves(self, model: str) -> bool:
        return model == self.model_name

    def client(self, address: str) -> DLMClient:
        with self._lock:
            c = self._clients.get(address)
            if c is None:
                c = self._clients[address] = DLMClient(address)
            return c

    def to_request(self, kind: str, body: Any, raw: dict, request_id: str, timeout_s: float,
                   received: float) -> DLMRequest:
        """Validate an OpenAI body (already parsed by openai_api.parse) plus the raw JSON's DLM extension fields."""
        name = self.model_name
        if kind != "completions":
            raise _reject("model", f"{name} supports /v1/completions only")
        prompt = body.prompt
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise _reject("prompt", f"{name} takes one text prompt (not token ids or a batch)")
        if not prompt:
            raise _reject("prompt", "must not be empty")
        sent = body.model_fields_set
        # the sampler is deterministic (confidence-ordered unmasking): refuse what would silently change nothing
        if "temperature" in sent and body.temperature != 0:
            raise _reject("temperature", f"{name} decodes deterministically; only 0 is supported "
                                         f"(got {body.temperature})")
        if "top_p" in sent and body.top_p != 1:
            raise _reject("top_p", f"{name} does not sample; only 1 is supported (got {body.top_p})")
        if "top_k" in sent and body.top_k != 0:
            raise _reject("top_k", f"{name} does not sample; only 0 is supported (got {body.top_k})")
        if body.stop:
            raise _reject("stop", f"stop strings are not supported by {name}")
        if body.ignore_eos:
            raise _reject("ignore_eos", f"not supported by {name} (its answers are EOS-padded to gen_len)")
        options: dict[str, Any] = {}
        for key, types in OPTION_TYPES.items():  # extension fields a completions body may carry
            if key not in raw or raw[key] is None:
                continue
            value = raw[key]
            if not isinstance(value, types) or (bool not in types and isinstance(value, bool)):
                raise _reject(key, f"must be {' or '.join(t.__name__ for t in types)} (got {value!r})")
            if isinstance(value, int) and not isinstance(value, bool) and key != "tau" and value < 1:
                raise _reject(key, f"must be at least 1 (got {value})")
            options[key] = value
        from_max = None
        if body.max_tokens is not None:
            if "gen_len" in options and options["gen_len"] != body.max_tokens:
                raise _reject("max_tokens", f"is the response length gen_len for {name}; it differs from "
                                            f"gen_len {options['gen_len']}")
            if "gen_len" not in options:
                options["gen_len"] = from_max = body.max_tokens
        return DLMRequest(prompt, options, request_id, timeout_s, received, from_max, name)

    def run(self, req: DLMRequest, cancel: threading.Event) -> Iterator[Chunk]:
        """Text chunks as the worker commits them; the last one has finish_reason, usage and timings."""
        deadline = req.received + req.timeout_s
        m = self.metrics
        addr: str | None = None
        chunks: Iterator | None = None
        outcome = "error"
        try:
            addr = self.router.pick()
            left = deadline - time.perf_counter()
            if left <= 0:
                raise DeadlineExceeded(f"request {req.request_id} ran past its deadline before reaching a worker")
            try:
                chunks = self.client(addr).generate(req.prompt, left, req.request_id, **req.options)
            except InvalidArgument as exc:
                raise self._blame_max_tokens(req, exc) from None
            text, ttft, last = "", 0.0, None
            for c in chunks:
                if cancel.is_set():
                    outcome = "cancelled"
                    return
                last = c
                if c.text and not text:
                    ttft = time.perf_counter() - req.received
                text += c.text
                if c.done:
                    break
                if c.text:
                    yield Chunk([], c.text, workers=[addr])
                if time.perf_counter() > deadline:
                    raise DeadlineExceeded(f"request {req.request_id} ran past its {req.timeout_s:.1f}s deadline")
            if last is None or not last.done:
                if cancel.is_set():
                    outcome = "cancelled"
                    return
                raise Unavailable(f"dlm worker {addr} ended the stream before the answer was complete")
            e2e = time.perf_counter() - req.received
            # char-level model: one character per token, so a text shorter than the committed span ended at EOS
            finish = "length" if len(text) >= last.committed_tokens else "stop"
            usage = {"prompt_tokens": len(req.prompt), "completion_tokens": last.committed_tokens,
                     "total_tokens": len(req.prompt) + last.committed_tokens}
            timings = {"ttft_s": ttft or e2e, "e2e_s": e2e, "steps": last.steps, "forward_passes": last.forward_passes,
                       "dlm_tokens": last.dlm_tokens, "committed_tokens": last.committed_tokens}
            m.dlm_e2e.observe(e2e)
            outcome = "ok"
            yield Chunk([], last.text, finish, usage, timings, [addr])
        except GeneratorExit:
            outcome = "cancelled"
            raise
        except Unavailable:
            if addr is not None:
                self.router.failed(addr)
            raise
        finally:
            if chunks is not None and hasattr(chunks, "close"):
                chunks.close()  # cancels the worker's call when we stopped early
            if addr is not None:
                self.router.finished(addr)
            m.requests.labels(req.api, outcome).inc()
            log(logger, "dlm request done", request_id=req.request_id, outcome=outcome, worker=addr)

    def _blame_max_tokens(self, req: DLMRequest, exc: InvalidArgument) -> InvalidArgument:
        """The worker names gen_len; when the client only sent max_tokens, name that instead."""
        if req.max_tokens_as_gen_len is None or "gen_len" not in exc.message:
            return exc
        return _reject("max_tokens", f"{req.max_tokens_as_gen_len} is used as {self.model_name}'s response length "
                                     f"(gen_len) and was rejected: {exc.message}")

    def health(self) -> list[dict[str, Any]]:
        out = []
        for ep in self.registry.endpoints("dlm"):
            ok = self.client(ep.address).healthy(timeout=1.0)
            entry: dict[str, Any] = {"name": ep.name, "role": ep.role, "address": ep.address, "ok": ok,
                                     "model": self.model_name}
            if not ok:
                entry["error"] = "not SERVING (gRPC health)"
            out.append(entry)
        return out

    def model_card(self) -> dict[str, Any]:
        return {"id": self.model_name, "object": "model", "created": 0, "owned_by": "tandem"}

    def close(self) -> None:
        with self._lock:
            for c in self._clients.values():
                try:
                    c.close()
                except TandemError:
                    pass
            self._clients.clear()


__all__ = ["DLMPath", "DLMRequest", "OPTION_FIELDS"]
