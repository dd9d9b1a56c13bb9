"""Flover-style temporal fusion decode scheduler, with static batching and one-at-a-time in the same code path.

Every iteration: apply cancellations, admit waiting requests (FIFO, within the KV budget), run ONE batched
decode step over the dense live rows, sample each row with its own parameters, emit, and evict finished
rows at once (their slot refilled by the last live row). The batching mode (the layout's `batching.policy`)
only changes who may join and when finished rows leave.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque

import torch

from services.batching.batch import DenseBatch, Row
from services.batching.request import NO_TOKEN, DecodeRequest, reserved_tokens, validate_request
from services.contracts.errors import InvalidArgument, ResourceExhausted, Unavailable
from services.engine import Engine
from services.engine.sampling import Sampler, sample_batch

MODES = ("fusion", "static", "sequential")  # a layout's `batching.policy`
log = logging.getLogger("tandem.fusion")

__all__ = ["MODES", "DecodeRequest", "FusionScheduler", "NO_TOKEN"]


class FusionScheduler:
    """Decode scheduler over one engine. mode: "fusion" (Flover), "static" (FasterTransformer-style batches
    that run until their longest request ends; new arrivals wait), "sequential" (one request at a time).

    Reservation policy: a request is admitted when prompt_len + max_tokens - 1 KV tokens fit the budget next
    to those already reserved; waiting requests are admitted strictly in arrival order (the head blocks the
    rest), so none starves. kv_budget_bytes None means max_batch full-context requests.
    """

    def __init__(self, engine: Engine, mode: str = "fusion", max_batch: int = 32, kv_budget_bytes: int | None = None,
                 *, initial_capacity: int = 256) -> None:
        if mode not in MODES:  # named after the layout key users set, `batching.policy`
            raise InvalidArgument(f"policy must be one of {', '.join(MODES)} (got {mode!r})", param="policy")
        if not isinstance(max_batch, int) or max_batch < 1:
            raise InvalidArgument(f"max_batch must be an integer >= 1 (got {max_batch!r})", param="max_batch")
        self.engine = engine
        self.mode = mode
        self.max_batch = 1 if mode == "sequential" else max_batch
        cfg = engine.cfg
        per_token = cfg.kv_bytes_per_token(torch.empty((), dtype=engine.dtype).element_size())
        budget = kv_budget_bytes if kv_budget_bytes is not None else self.max_batch * cfg.max_seq_len * per_token
        if budget < per_token:
            raise InvalidArgument(f"kv_budget_bytes {budget} is below one token of KV ({per_token} bytes)",
                                  param="kv_budget_bytes")
        self.batch = DenseBatch(engine, self.max_batch, budget, initial_capacity)
        self._lock = threading.Lock()  # guards _waiting, _cancels, _known, counters read by stats()
        self._wake = threading.Condition(self._lock)
        self._step_lock = threading.Lock()  # one step at a time, whoever calls it
        self._waiting: deque[DecodeRequest] = deque()
        self._cancels: set[str] = set()
        self._known: set[str] = set()  # ids waiting or live
        self._waiting_bytes = 0  # KV reservations of the waiting requests (claimed, not admitted yet)
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._closed = False
        self.counters = {"iterations": 0, "tokens": 0, "admitted": 0, "finished": 0, "cancelled": 0,
                         "errors": 0, "decode_s": 0.0, "step_s": 0.0, "padded_rows": 0}

    # ---- API used by the workers (thread-safe) ----
    def submit(self, req: DecodeRequest) -> None:
        """Queue a request whose prompt KV is computed. ResourceExhausted if it could never fit the budget."""
        cfg = self.engine.cfg
        validate_request(req, cfg, self.engine.dtype)
        need = reserved_tokens(req.prompt_len, req.params.max_tokens, cfg.max_seq_len)
        if need * self.batch.bytes_per_token > self.batch.budget_bytes:
            raise ResourceExhausted(f"request {req.request_id} needs {need * self.batch.bytes_per_token} bytes of KV "
                                    f"(prompt {req.prompt_len} + max_tokens {req.params.max_tokens}); the budget is "
                                    f"{self.batch.budget_bytes} bytes")
        with self._wake:
            if self._closed:
                raise Unavailable("the decode scheduler is stopped")
            if req.request_id in self._known:
                raise InvalidArgument(f"request_id {req.request_id!r} is already in flight", param="request_id")
            self._known.add(req.request_id)
            self._waiting.append(req)
            self._waiting_bytes += need * self.batch.bytes_per_token
            self._wake.notify()

    def cancel(self, request_id: str) -> None:
        """Ask to drop a request; it gets emit(NO_TOKEN, "cancelled") and its slot and KV are free after the next step."""
        with self._wake:
            if request_id in self._known:
                self._cancels.add(request_id)
                self._wake.notify()

    def stats(self) -> dict:
        b = self.batch
        with self._lock:
            out = dict(self.counters)
            out.update(policy=self.mode, live=sum(r.done is None for r in b.rows), rows=len(b.rows),
                       waiting=len(self._waiting), kv_used_bytes=b.used_bytes, kv_waiting_bytes=self._waiting_bytes,
                       kv_budget_bytes=b.budget_bytes,
                       kv_allocated_bytes=b.kv.nbytes(), kv_capacity=b.kv.capacity, max_batch=self.max_batch,
                       moves=b.moves, reorder_s=b.reorder_s, grows=b.grows, grow_s=b.grow_s)
        return out

    def slot_map(self) -> list[str]:
        """Request id held by each dense slot 0..n-1."""
        return self.batch.slot_map()

    def idle(self) -> bool:
        with self._lock:
            return not self._waiting and not self.batch.rows and not self._cancels

    # ---- the loop ----
    def step(self) -> int:
        """One fused iteration; returns the number of rows still in the batch."""
        with self._step_lock:
            t0 = time.perf_counter()
            with self._lock:
                cancels, self._cancels = self._cancels, set()
            self._apply_cancels(cancels)
            self._admit()
            if self.batch.rows:
                self._decode()
            with self._lock:
                self.counters["step_s"] += time.perf_counter() - t0
            return len(self.batch.rows)

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name=f"fusion-{self.mode}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the loop; every request still waiting or live ends with "cancelled"."""
        with self._wake:
            self._stopping = True
            self._closed = True
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        with self._step_lock:
            with self._lock:
                waiting, self._waiting = list(self._waiting), deque()
                self._waiting_bytes = 0
                self._known.clear()
                self._cancels.clear()
            for req in waiting:
                self._emit(req, NO_TOKEN, "cancelled")
            rows = [r for r in self.batch.rows if r.done is None]
            self.batch.evict(list(range(len(self.batch.rows))))
            for r in rows:
                self._emit(r.req, NO_TOKEN, "cancelled")

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._stopping and not self._waiting and not self.batch.rows and not self._cancels:
                    self._wake.wait()
                if self._stopping:
                    return
            try:
                self.step()
            except Exception as exc:  # noqa: BLE001 - the loop must survive; the batch is discarded
                log.exception("decode step failed; failing the live batch")
                self._fail_batch(exc)

    # ---- one iteration, in parts ----
    def _apply_cancels(self, ids: set[str]) -> None:
        if not ids:
            return
        with self._lock:
            dropped = [r for r in self._waiting if r.request_id in ids]
            self._waiting = deque(r for r in self._waiting if r.request_id not in ids)
            self._waiting_bytes -= sum(self._reservation_bytes(r) for r in dropped)
        for req in dropped:
            self._finish_bookkeeping(req, "cancelled")
            self._emit(req, NO_TOKEN, "cancelled")
        dead = []
        for s, row in enumerate(self.batch.rows):
            if row.done is None and row.req.request_id in ids:
                self._mark_done(s, row, "cancelled")
                self._emit(row.req, NO_TOKEN, "cancelled")
                dead.append(s)
        self._release(dead)

    def _admit(self) -> None:
        b = self.batch
        if self.mode != "fusion" and b.rows:
            return  # static / sequential: the running batch must drain first
        cfg = self.engine.cfg
        while True:
            with self._lock:
                if not self._waiting:
                    return
                req = self._waiting[0]
                need = reserved_tokens(req.prompt_len, req.params.max_tokens, cfg.max_seq_len)
                if not b.fits(need):
                    return  # FIFO: the head waits for memory and nobody overtakes it
                self._waiting.popleft()
                self._waiting_bytes -= need * b.bytes_per_token
            row = Row(req=req, sampler=Sampler(req.params), reserved=need, last_token=req.first_token, generated=1)
            # Nothing left to generate (prefill's token already ended it): finish without taking a slot.
            reason = self._finish_reason(row, req.first_token)
            if reason is not None:
                self._finish_bookkeeping(req, reason)
                self._emit(req, NO_TOKEN, reason)
                continue
            b.admit(row)
            with self._lock:
                self.counters["admitted"] += 1

    def _decode(self) -> None:
        b = self.batch
        rows = b.rows
        n = len(rows)
        t0 = time.perf_counter()
        logits = self.engine.decode([r.last_token for r in rows], b.kv, slice(0, n))
        live = [s for s, r in enumerate(rows) if r.done is None]
        picks = sample_batch(logits[live] if len(live) < n else logits, [rows[s].sampler for s in live])
        for s, r in enumerate(rows):
            if r.done is not None:
                b.kv.lengths[s] = r.frozen_len  # padding row of a static batch: its output is thrown away
        decode_s = time.perf_counter() - t0
        finished = []
        for s, tok in zip(live, picks, strict=True):
            r = rows[s]
            r.generated += 1
            r.last_token = tok
            reason = self._finish_reason(r, tok)
            if reason is not None:
                self._mark_done(s, r, reason)
                finished.append(s)
            if not self._emit(r.req, tok, reason) and reason is None:
                self._mark_done(s, r, "cancelled")  # the consumer is gone: treat as a cancel
                finished.append(s)
        with self._lock:
            c = self.counters
            c["iterations"] += 1
            c["tokens"] += len(live)
            c["padded_rows"] += n - len(live)
            c["decode_s"] += decode_s
        self._release(finished)

    def _reservation_bytes(self, req: DecodeRequest) -> int:
        cfg = self.engine.cfg
        return reserved_tokens(req.prompt_len, req.params.max_tokens, cfg.max_seq_len) * self.batch.bytes_per_token

    def _finish_reason(self, row: Row, token: int) -> str | None:
        p = row.req.params
        if not p.ignore_eos and token in self.engine.cfg.eos_ids:
            return "stop"
        if row.generated >= p.max_tokens:
            return "length"
        if row.req.prompt_len + row.generated - 1 >= row.reserved:  # context length reached
            return "length"
        return None

    def _mark_done(self, slot: int, row: Row, reason: str) -> None:
        row.done = reason
        # A padding row keeps running (static batching's waste) over its own, now dead, KV. Its next write
        # lands at frozen_len, so keep that inside the reservation: the buffer is sized to reservations.
        row.frozen_len = min(self.batch.kv.lengths[slot], row.reserved - 1)
        self.batch.kv.lengths[slot] = row.frozen_len
        self._finish_bookkeeping(row.req, reason)

    def _finish_bookkeeping(self, req: DecodeRequest, reason: str) -> None:
        with self._lock:
            self._known.discard(req.request_id)
            key = {"cancelled": "cancelled", "error": "errors"}.get(reason, "finished")
            self.counters[key] += 1

    def _release(self, slots: list[int]) -> None:
        """Fusion and sequential free finished rows now; a static batch keeps them as padding until all are done."""
        b = self.batch
        if self.mode == "static":
            if b.rows and all(r.done is not None for r in b.rows):
                b.evict(list(range(len(b.rows))))
        elif slots:
            b.evict(slots)

    def _emit(self, req: DecodeRequest, token: int, reason: str | None) -> bool:
        try:
            req.emit(token, reason)
            return True
        except Exception:  # noqa: BLE001 - a broken consumer must not take the batch down
            log.warning("emit failed for request %s; dropping it", req.request_id, exc_info=True)
            return False

    def _fail_batch(self, exc: Exception) -> None:
        b = self.batch
        for s, r in enumerate(b.rows):
            if r.done is None:
                self._mark_done(s, r, "error")
                self._emit(r.req, NO_TOKEN, "error")
        b.evict(list(range(len(b.rows))))
