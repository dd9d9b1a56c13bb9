"""One request through the cluster: validate, route, prefill (+ KV push), decode stream, stop strings, timings.

Both front doors (HTTP and gRPC) call `Gateway.run`, a plain iterator driven from one thread; another
thread cancels it by setting `cancel`, which closes the upstream decode stream at the next token.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

from services.contracts.errors import (
    DeadlineExceeded,
    InvalidArgument,
    ResourceExhausted,
    TandemError,
    Unavailable,
)
from services.contracts.roles import LLM_ROLES
from services.engine.sampling import SamplingParams
from services.gateway.admission import Admission, Ticket, Watchdog
from services.gateway.metrics import GatewayMetrics
from services.gateway.progress import Progress, retryable
from services.gateway.textstream import TextStream
from services.grpcutil import get_logger, log
from services.kv.sender import push_timeout
from services.registry import Registry
from services.registry.live import LiveRegistry
from services.router import Route, make_router

logger = get_logger("tandem.gateway")
DEFAULT_MAX_INFLIGHT = 256
DEFAULT_STALL_S = 15.0


@dataclass(slots=True)
class GenRequest:
    """A validated request as both front doors hand it over. `received` is on time.perf_counter()."""

    prompt_ids: list[int]
    params: SamplingParams
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex[:16])
    timeout_s: float = 300.0
    api: str = "grpc"
    received: float = field(default_factory=time.perf_counter)


@dataclass(slots=True)
class Chunk:
    """What the request adds at one step; the last chunk has finish_reason, usage and timings."""

    token_ids: list[int]
    text: str
    finish_reason: str | None = None
    usage: dict[str, int] | None = None
    timings: dict[str, Any] | None = None
    workers: list[str] = field(default_factory=list)


def new_request_id() -> str:
    return uuid.uuid4().hex[:16]


class Gateway:
    """Holds the tokenizer, the router and one WorkerClient per worker; runs requests."""

    def __init__(self, tokenizer: Any, registry: Registry, model_name: str, *, routing: str = "jsq",
                 default_timeout_s: float = 300.0, client_factory: Any = None,
                 metrics: GatewayMetrics | None = None, max_inflight: int = DEFAULT_MAX_INFLIGHT,
                 stall_s: float = DEFAULT_STALL_S) -> None:
        if client_factory is None:
            from services.workers.client import WorkerClient as client_factory
        self.tokenizer = tokenizer
        self.registry = registry
        self.model_name = model_name
        self.default_timeout_s = default_timeout_s
        self.metrics = metrics or GatewayMetrics()
        self._factory = client_factory
        self._clients: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._context: int | None = None
        self.admission = Admission(max_inflight)
        self.metrics.inflight.set_function(lambda: self.admission.inflight)
        self.stall_s = stall_s
        self.watchdog = Watchdog(stall_s)
        self._beat = registry.last_beat if isinstance(registry, LiveRegistry) else (lambda address: None)
        # loads come from the registry's heartbeats when it has them (no RPC per pick), else from each worker
        info = registry.info if isinstance(registry, LiveRegistry) else (lambda a: self.client(a).info(timeout=1.0))
        self.router = make_router(routing, registry, info)
        self.dlm: Any = None  # the diffusion-LM path, when the registry lists dlm workers
        if registry.endpoints("dlm"):
            from services.gateway.dlm import DLMPath

            self.dlm = DLMPath(registry, self.metrics)

    def client(self, address: str) -> Any:
        with self._lock:
            c = self._clients.get(address)
            if c is None:
                c = self._clients[address] = self._factory(address)
            return c

    def admit(self) -> Ticket:
        """A place for one request, or at once ResourceExhausted (full) / Unavailable (draining)."""
        return self.admission.enter()

    def drain(self, grace_s: float) -> bool:
        """Refuse new requests; let those in flight finish for up to `grace_s`. True when all did."""
        log(logger, "draining", inflight=self.admission.inflight, grace_s=grace_s)
        return self.admission.drain(grace_s)

    def context_length(self) -> int:
        """The smallest context any LLM worker serves (learned from their Info once one answers)."""
        if self._context is None:
            lengths = []
            for ep in self.registry.all():
                if ep.role not in LLM_ROLES:
                    continue
                try:
                    n = self.client(ep.address).info(timeout=1.0).max_seq_len
                except TandemError:
                    continue
                if n:
                    lengths.append(n)
            if not lengths:
                raise Unavailable("no worker answered to report its context length")
            self._context = min(lengths)
        return self._context

    def check(self, prompt_ids: list[int], params: SamplingParams, prompt_param: str = "prompt") -> None:
        """Reject what no worker could run, naming the field (InvalidArgument)."""
        params.validate()
        if not prompt_ids:
            raise InvalidArgument(f"{prompt_param}: must not be empty", param=prompt_param)
        vocab = self.tokenizer.vocab_size
        bad = next((t for t in prompt_ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise InvalidArgument(f"{prompt_param}: token id {bad} is outside the vocabulary (size {vocab})",
                                  param=prompt_param)
        ctx = self.context_length()
        if len(prompt_ids) + params.max_tokens > ctx:
            err = InvalidArgument(f"{prompt_param}: {len(prompt_ids)} prompt tokens + max_tokens {params.max_tokens} "
                                  f"exceed the model's context length {ctx}", param=prompt_param)
            err.openai_code = "context_length_exceeded"  # type: ignore[attr-defined]
            raise err

    def run(self, req: GenRequest, cancel: threading.Event | None = None) -> Iterator[Chunk]:
        """Generate; yields one Chunk per token (the last one carries finish_reason, usage, timings).

        The gateway owns the request until its last token: a failed prefill, KV push or decode stream (dead,
        broken, or silent for `stall_s`) moves it to another (prefill, decode) pair, which re-prefills the
        prompt plus the tokens already generated and continues the same stream. Raises TandemError when no
        pair is left. If `cancel` gets set, the upstream stream is closed (freeing the decode slot and KV)
        and the iterator ends without a final chunk.
        """
        cancel = cancel or threading.Event()
        if not isinstance(req, GenRequest):  # a DLMRequest (services.gateway.dlm): the diffusion path runs it
            yield from self.dlm.run(req, cancel)
            return
        m, n = self.metrics, len(req.prompt_ids)
        st = Progress(TextStream(self.tokenizer, req.params.stop), deadline=req.received + req.timeout_s)
        exclude: set[str] = set()
        outcome, route = "error", None
        m.waiting.inc()
        m.prompt_tokens.inc(n)
        try:
            while True:
                route = self._pick(req, st, exclude)
                try:
                    yield from self._attempt(req, route, st, cancel)
                    outcome = st.outcome
                    return
                except TandemError as exc:
                    if not retryable(exc, st, cancel):
                        raise
                    self._avoid(req, route, exc, st, exclude)
                finally:
                    self.router.finished(route)
        except GeneratorExit:  # the consumer stopped reading (a gRPC client cancelled): same as cancel
            outcome = "cancelled"
            raise
        finally:
            if st.first_at is None:
                m.waiting.dec()
            else:
                m.running.dec()
            m.requests.labels(req.api, outcome).inc()
            log(logger, "request done", request_id=req.request_id, outcome=outcome, prompt_tokens=n,
                workers=route.workers if route else [], attempts=st.attempts)

    def _pick(self, req: GenRequest, st: Progress, exclude: set[str]) -> Route:
        """A pair for the next attempt. After a failure, a worker too busy to answer its poll in time looks
        down for a moment: keep asking for up to `stall_s` before telling the client no pair is left."""
        give_up = min(st.deadline, time.perf_counter() + self.stall_s)
        while True:
            try:
                return self.router.pick(len(req.prompt_ids) + len(st.generated), frozenset(exclude))
            except Unavailable:
                if st.last_error is None:
                    raise
                if time.perf_counter() >= give_up:
                    break
            time.sleep(0.25)
        if isinstance(st.last_error, ResourceExhausted):  # every pair left is full: a 429, not an outage
            raise ResourceExhausted(f"request {req.request_id}: every worker pair is full ({st.last_error.message})",
                                    retry_after_s=st.last_error.retry_after_s)
        raise Unavailable(f"request {req.request_id}: no (prefill, decode) pair left after {st.attempts} "
                          f"attempts; last error: {st.last_error.message}")

    def _avoid(self, req: GenRequest, route: Route, exc: TandemError, st: Progress, exclude: set[str]) -> None:
        """Leave the failed half of the pair out of this request's next pick; mark it down for everyone."""
        stalled = bool(st.stalled)
        decode_side = st.decoding or route.mixed or route.decode in exc.message or exc.message.startswith("KV push to")
        bad = st.stalled or (route.decode if decode_side else route.prefill)
        exclude.add(bad)
        if not isinstance(exc, ResourceExhausted):  # a full worker is busy, not broken
            self.router.failed(bad, hold_s=self.stall_s if stalled else 0.0)
        st.last_error, st.stalled = exc, ""
        phase = "decode" if st.generated else "prefill"
        self.metrics.retries.labels(phase).inc()
        log(logger, f"moving request to another pair: {exc.message}", logging.WARNING, request_id=req.request_id,
            failed=bad, phase=phase, tokens_sent=len(st.generated), stalled=stalled)

    def _attempt(self, req: GenRequest, route: Route, st: Progress, cancel: threading.Event) -> Iterator[Chunk]:
        """One pair's try: prefill prompt + tokens so far, then stream on; raises TandemError if the pair fails."""
        m = self.metrics
        st.attempts += 1
        st.decoding = False
        prompt = req.prompt_ids + st.generated
        params = replace(req.params, max_tokens=req.params.max_tokens - len(st.generated))
        if params.max_tokens < 1:  # the pair died between the last token and its finish: nothing is left to do
            yield self._last(req, route, st, "length", [], "")
            return
        events = None
        try:
            # The prompt call has no tokens to watch: it is judged by its worker's heartbeat (a SIGSTOPped or hung
            # worker stops beating; a busy one, however long its forward pass, does not).
            silent = self.watchdog.watch(beat=lambda: self._beat(route.prefill))
            try:
                pr, events = self._start(req.request_id, prompt, params, route, st.deadline, cancel, silent.bind)
            except TandemError:
                if not silent.fired:
                    raise
                st.stalled = route.prefill
                raise Unavailable(f"prefill worker {route.prefill} stalled: no heartbeat for {self.stall_s:g}s "
                                  f"during request {req.request_id}'s prompt") from None
            finally:
                self.watchdog.unwatch(silent)
                self.router.prefill_done(route, len(prompt))
            if events is None:  # cancelled while the prompt ran; its KV is released
                st.outcome = "cancelled"
                return
            st.pr = st.pr or pr
            st.decoding = True
            watch = self.watchdog.watch(events.cancel) if hasattr(events, "cancel") else None
            try:
                for tid, fin, fd in _tokens(pr, events):
                    if watch is not None:
                        watch.kick()
                    if cancel.is_set():
                        st.outcome = "cancelled"
                        return
                    now = time.perf_counter() - req.received
                    if fd is not None and not st.first_decode:
                        st.first_decode = fd
                    if st.first_at is None:
                        st.first_at = now
                        m.waiting.dec()
                        m.running.inc()
                    if fin == "cancelled":
                        raise Unavailable(f"worker {route.decode} cancelled request {req.request_id}")
                    # A worker's "stop" always means its end-of-sequence token: neither text nor a counted token.
                    ids = [tid] if tid >= 0 and fin != "stop" else []
                    text = ""
                    if ids:
                        if st.times:
                            m.itl.observe(now - st.times[-1])
                        st.times.append(now)
                        st.generated.append(tid)
                        text = st.stream.push(tid)
                        if st.stream.stopped:
                            fin = "stop"
                    if fin is not None:
                        yield self._last(req, route, st, fin, ids, text)
                        return
                    yield Chunk(ids, text, workers=route.workers)
                    if time.perf_counter() > st.deadline:
                        raise DeadlineExceeded(f"request {req.request_id} ran past its {req.timeout_s:.1f}s deadline")
            except Unavailable:
                st.stalled = route.decode if watch is not None and watch.fired else ""
                raise
            finally:
                if watch is not None:
                    self.watchdog.unwatch(watch)
            if cancel.is_set():
                st.outcome = "cancelled"
                return
            raise Unavailable(f"worker {route.decode} ended the token stream without a finish reason")
        finally:
            if events is not None and hasattr(events, "close"):
                events.close()  # cancels the decode call when we stopped early (stop string, cancel, error)

    def _last(self, req: GenRequest, route: Route, st: Progress, fin: str, ids: list[int], text: str) -> Chunk:
        n = len(req.prompt_ids)
        text += st.stream.finish()
        e2e = time.perf_counter() - req.received
        timings = self._timings(st.pr, st.times, st.first_at or e2e, e2e, st.first_decode)
        self._observe(timings, st.pr.kv_bytes)
        usage = {"prompt_tokens": n, "completion_tokens": len(st.times), "total_tokens": n + len(st.times)}
        st.outcome = "ok"
        return Chunk(ids, text, fin, usage, timings, route.workers)

    def _start(self, rid: str, prompt: list[int], params: SamplingParams, route: Route, deadline: float,
               cancel: threading.Event, on_call: Callable) -> tuple[Any, Iterator | None]:
        """Run the prompt phase; return the prefill result and the decode token iterator (None if cancelled).
        `on_call` gets the prompt call's cancel (the stall watchdog's)."""
        if route.mixed:
            return self.client(route.prefill).generate(rid, prompt, params, _remaining(deadline, rid), on_call=on_call)
        decode_addr = route.decode if params.max_tokens > 1 else ""
        pr = self.client(route.prefill).prefill(rid, prompt, params, decode_addr, _remaining(deadline, rid),
                                                kv_timeout=push_timeout(len(prompt)), on_call=on_call)
        if pr.finished or cancel.is_set():
            if pr.handle:  # KV was pushed but will never be decoded: free it now rather than at lease expiry
                try:
                    self.client(route.decode).release(pr.handle)
                except TandemError as exc:
                    log(logger, f"release failed: {exc.message}", request_id=rid)
            return pr, (iter(()) if pr.finished else None)
        return pr, self.client(route.decode).decode(rid, pr.handle, pr.first_token, params,
                                                    _remaining(deadline, rid))

    @staticmethod
    def _timings(pr: Any, times: list[float], ttft: float, e2e: float, first_decode: float) -> dict[str, Any]:
        t = pr.timings
        gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
        return {"queue_s": t.queue_s, "prefill_s": t.prefill_s, "kv_transfer_s": t.kv_transfer_s,
                "first_decode_s": first_decode,
                "gateway_s": max(0.0, ttft - t.queue_s - t.prefill_s - t.kv_transfer_s),
                "ttft_s": ttft, "e2e_s": e2e, "mean_tbt_s": sum(gaps) / len(gaps) if gaps else 0.0,
                "kv_bytes": pr.kv_bytes, "token_times_s": [round(x, 6) for x in times]}

    def _observe(self, t: dict[str, Any], kv_bytes: int) -> None:
        m = self.metrics
        m.ttft.observe(t["ttft_s"])
        m.e2e.observe(t["e2e_s"])
        for phase in ("queue", "prefill", "kv_transfer", "first_decode", "gateway"):
            m.ttft_phase.labels(phase).observe(t[f"{phase}_s"])
        if t["token_times_s"]:
            m.generation_tokens.inc(len(t["token_times_s"]))
        if kv_bytes:
            m.kv_bytes.inc(kv_bytes)
            m.kv_seconds.observe(t["kv_transfer_s"])

    def health(self) -> dict[str, Any]:
        """Each worker's reachability and load; status 'ok' when a route can be made."""
        workers = []
        for ep in self.registry.all():
            if ep.role not in LLM_ROLES:
                continue
            entry: dict[str, Any] = {"name": ep.name, "role": ep.role, "address": ep.address}
            try:
                i = self.client(ep.address).info(timeout=1.0)
                entry.update(ok=True, live_requests=i.live_requests, waiting_requests=i.waiting_requests,
                             pending_prompt_tokens=i.pending_prompt_tokens, kv_free_bytes=i.kv_free_bytes)
            except TandemError as exc:
                entry.update(ok=False, error=exc.message)
            workers.append(entry)
        up = {w["role"] for w in workers if w["ok"]}
        ok = "mixed" in up or {"prefill", "decode"} <= up
        doc: dict[str, Any] = {"model": self.model_name, "workers": workers}
        if self.dlm is not None:
            dlm = self.dlm.health()
            workers += dlm
            doc["models"] = [self.model_name, self.dlm.model_name]
            if not any(ep.role in LLM_ROLES for ep in self.registry.all()):
                ok = any(w["ok"] for w in dlm)  # a dlm-only gateway
        if self.admission.draining:
            return {"status": "draining", **doc}
        return {"status": "ok" if ok else "unavailable", **doc}

    def close(self) -> None:
        self.registry.close()
        if self.dlm is not None:
            self.dlm.close()
        with self._lock:
            for c in self._clients.values():
                c.close()
            self._clients.clear()


def _tokens(pr: Any, events: Iterator) -> Iterator[tuple[int, str | None, float | None]]:
    """The prefill-sampled first token, then the decode stream's tokens, as (id, finish, first_decode_s)."""
    yield pr.first_token, pr.finished, None
    for ev in events:
        yield ev.token_id, ev.finish_reason, ev.first_decode_s


def _remaining(deadline: float, rid: str) -> float:
    left = deadline - time.perf_counter()
    if left <= 0:
        raise DeadlineExceeded(f"request {rid} ran past its deadline before reaching a worker")
    return left
