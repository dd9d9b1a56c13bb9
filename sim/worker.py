"""One simulated worker: a prefill queue, a decode batch and the KV it holds (a prefill, decode or mixed worker;
Splitwise's prompt/token/mixed machine).

Speed: a decode batch is advanced over all the iterations until its membership next changes in ONE SimPy event.
Iteration i of a batch of b requests with total context C0 takes a + c·(C0 + i·b), so k iterations take
S(k) = k·a + c·(k·C0 + b·k(k-1)/2); an arrival that must join cuts the segment at the next iteration boundary.
Members are kept in a heap keyed by the worker iteration at which they finish, so a segment costs O(1) plus
O(log b) per member that joins or leaves: no per-token and no per-member work.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from functools import partial

import simpy

from services.contracts.layout import Batching
from services.contracts.routing import Load
from sim.kvlink import Fabric
from sim.perf import PerfModel
from sim.state import Requests, Tally


def seg_time(k: float, a: float, c: float, c0: float, b: int) -> float:
    return k * a + c * (k * c0 + b * k * (k - 1) / 2.0)


def iters_done(elapsed: float, a: float, c: float, c0: float, b: int) -> int:
    """Largest i with S(i) <= elapsed."""
    if c == 0.0 or b == 0:
        return int(elapsed / a + 1e-9)
    qa, qb = c * b / 2.0, a + c * c0 - c * b / 2.0
    i = int((-qb + math.sqrt(qb * qb + 4 * qa * elapsed)) / (2 * qa))
    while seg_time(i + 1, a, c, c0, b) <= elapsed:
        i += 1
    while i > 0 and seg_time(i, a, c, c0, b) > elapsed:
        i -= 1
    return i


class Worker:
    """Runs prefill batches, mixed iterations (prefill + one decode step) and multi-iteration decode segments."""

    # None: advance a fused batch to its next membership change in one event. 1: one event per iteration, the
    # way per-iteration simulators work (kept for the speed benchmark's side-by-side and for tests).
    segment_limit: int | None = None

    def __init__(self, env: simpy.Environment, idx: int, role: str, perf: PerfModel, batching: Batching,
                 reqs: Requests, tally: Tally, cluster: object, kv_usable_fraction: float,
                 fabric: Fabric, *, kv_transfer: str = "layerwise", mixed_overhead: float = 0.0) -> None:
        self.env, self.idx, self.role, self.perf, self.reqs, self.tally = env, idx, role, perf, reqs, tally
        self.cluster = cluster  # has .workers and .on_done(rid)
        self.policy = batching.policy
        self.fusion = batching.policy == "fusion"
        self.max_batch = 1 if batching.policy == "sequential" else batching.max_batch
        self.max_batch_tokens = batching.max_batch_tokens
        cap = perf.kv_capacity_tokens(kv_usable_fraction)
        if batching.kv_budget_mb is not None:
            cap = min(cap, int(batching.kv_budget_mb * 1e6 // perf.spec.kv_bytes_per_token))
        self.kv_cap = cap
        self.kv_used = 0  # tokens reserved by admitted decode requests (prompt + output, no preemption)
        self.dec_assigned = 0  # tokens of every request routed here for decode and not finished
        self.prefill_q: deque[int] = deque()
        self.prefill_pending = 0  # prompt tokens queued or in flight
        self.dec_wait: deque[int] = deque()
        self.it = 0  # decode iterations this worker has run
        self.heap: list[tuple[int, int]] = []  # (iteration at which the member finishes, rid)
        self.join_it: dict[int, int] = {}
        self.fresh: list[int] = []  # members that have not yet produced their second token
        self.ctx = 0  # total context of the active decode batch
        self.busy = False
        self.version = 0
        self.seg: tuple = ()
        self.kv_bytes = perf.spec.kv_bytes_per_token
        self.layers = perf.spec.layers
        self.fabric = fabric
        self.layerwise = kv_transfer == "layerwise"
        self.mixed_overhead = mixed_overhead
        self.idle_w = perf.hw.power_idle_w
        # what the router ranks by (services.contracts.routing); KV counts every token routed here for decode
        self.load = Load(idx, kv_free_bytes=cap * self.kv_bytes, kv_total_bytes=cap * self.kv_bytes)

    # -- inputs from the router / other workers -------------------------------------------------------------
    def add_prefill(self, rid: int) -> None:
        self.prefill_q.append(rid)
        self.prefill_pending += self.reqs.prompt[rid]
        self.load.pending_prompt_tokens = self.prefill_pending
        self.load.waiting_requests += 1
        self._poke()

    def assign_decode(self, need: int) -> None:
        """The router sent a request's decode phase here: reserve its KV share in the router's view."""
        self.dec_assigned += need
        self.load.live_requests += 1
        self.load.kv_free_bytes = (self.kv_cap - self.dec_assigned) * self.kv_bytes

    def release_decode(self, need: int) -> None:
        self.dec_assigned -= need
        self.load.live_requests -= 1
        self.load.kv_free_bytes = (self.kv_cap - self.dec_assigned) * self.kv_bytes

    def add_decode(self, rid: int) -> None:
        self.dec_wait.append(rid)
        self._poke()

    def _poke(self) -> None:
        if not self.busy:
            self._next()
        elif self.fusion and self.seg[0] == "decode":
            self._cut()

    # -- scheduling -----------------------------------------------------------------------------------------
    def _admit(self) -> None:
        if not self.dec_wait or (not self.fusion and self.heap):
            return
        r, heap, it = self.reqs, self.heap, self.it
        while self.dec_wait and len(heap) < self.max_batch:
            rid = self.dec_wait[0]
            need = r.prompt[rid] + r.output[rid]
            if self.kv_used + need > self.kv_cap and heap:
                break  # wait for memory; an empty worker always takes one (the router checked it fits)
            self.dec_wait.popleft()
            self.kv_used += need
            heapq.heappush(heap, (it + r.output[rid] - r.gen[rid], rid))
            self.join_it[rid] = it
            self.fresh.append(rid)
            self.ctx += r.prompt[rid] + r.gen[rid]

    def _next(self) -> None:
        """Start the next unit of work, if any (called when not busy)."""
        if self.fusion:
            self._admit()
            if self.prefill_q:
                self._start_prefill()
            elif self.heap:
                self._start_decode()
            return
        # static / sequential: a running batch is never joined; prompts go first once it has drained
        if not self.heap and self.prefill_q and (self.policy == "static" or not self.dec_wait):
            self._start_prefill()
            return
        self._admit()
        if self.heap:
            self._start_decode()

    def _start_prefill(self) -> None:
        r = self.reqs
        batch: list[int] = []
        tokens = 0
        sum_sq = 0.0
        while self.prefill_q and len(batch) < self.max_batch:
            p = r.prompt[self.prefill_q[0]]
            if batch and tokens + p > self.max_batch_tokens:
                break
            batch.append(self.prefill_q.popleft())
            tokens += p
            sum_sq += float(p) * p
        b = len(self.heap)  # decode requests riding along (mixed iteration)
        t, watts = self.perf.prefill(tokens + b, sum_sq)
        if b:
            # a mixed iteration: sim.mixed_overhead (splitwise-sim: 0.1) plus reading the decoders' KV
            t = t * (1.0 + self.mixed_overhead) + self.perf.decode(b)[1] * self.ctx
        self.busy = True
        self.version += 1
        now = self.env.now
        self.seg = ("prefill", now, t, watts, batch, tokens)
        self.env.timeout(t).callbacks.append(partial(self._end_prefill, self.version))
        self._push_kv(batch, now, t)

    def _push_kv(self, batch: list[int], t0: float, t: float) -> None:
        """Start the KV transfers of the prompts that decode elsewhere (sim/kvlink.py): layer-wise from the
        first layer's end, or whole after the prefill."""
        r, workers, fabric = self.reqs, self.cluster.workers, self.fabric
        for rid in batch:
            dest = r.dest[rid]
            if dest == self.idx or r.output[rid] <= 1:
                continue
            nbytes = r.prompt[rid] * self.kv_bytes
            if self.layerwise:
                ready, floor = t0 + t / self.layers, t0 + t + fabric.alone_s(nbytes / self.layers)
            else:
                ready = floor = t0 + t
            fabric.send(self.idx, dest, nbytes, ready, floor, partial(workers[dest].add_decode, rid))

    def _start_decode(self) -> None:
        b = len(self.heap)
        a, c, watts = self.perf.decode(b)
        if self.fusion:
            k = self.heap[0][0] - self.it
            if self.segment_limit is not None:
                k = min(k, self.segment_limit)
        else:
            k = max(self.heap)[0] - self.it
        t = seg_time(k, a, c, self.ctx, b)
        self.busy = True
        self.version += 1
        self.seg = ("decode", self.env.now, t, watts, k, a, c, self.ctx, b)
        self.env.timeout(t).callbacks.append(partial(self._end_decode, self.version))

    def _cut(self) -> None:
        """Something must join: end the running decode segment at the next iteration boundary."""
        _, t0, _, watts, k, a, c, c0, b = self.seg
        i = iters_done(self.env.now - t0, a, c, c0, b) + 1
        if i >= k:
            return
        t = seg_time(i, a, c, c0, b)
        self.version += 1
        self.seg = ("decode", t0, t, watts, i, a, c, c0, b)
        self.env.timeout(t0 + t - self.env.now).callbacks.append(partial(self._end_decode, self.version))

    # -- completions ----------------------------------------------------------------------------------------
    def _end_prefill(self, version: int, _ev: object) -> None:
        if version != self.version:
            return
        _, t0, t, watts, batch, tokens = self.seg
        now = self.env.now
        self.tally.events += 1
        self.tally.busy(t0, now, watts - self.idle_w)
        r = self.reqs
        self.prefill_pending -= tokens
        self.load.pending_prompt_tokens = self.prefill_pending
        self.load.waiting_requests -= len(batch)
        if self.heap:  # the riding decode requests got one token each
            self._advance(1, t0, t, t)
        for rid in batch:
            r.first_tok[rid] = now
            r.gen[rid] += 1
            if r.output[rid] <= 1:
                r.finish[rid] = now
                self.cluster.on_done(rid)
            elif r.dest[rid] == self.idx:
                self.dec_wait.append(rid)
            # else: its KV is on the way (_push_kv); the destination's add_decode runs on delivery
        self.busy = False
        self._next()

    def _end_decode(self, version: int, _ev: object) -> None:
        if version != self.version:
            return
        _, t0, t, watts, k, a, c, c0, b = self.seg
        now = self.env.now
        self.tally.events += 1
        self.tally.busy(t0, now, watts - self.idle_w)
        self._advance(k, t0, seg_time(1, a, c, c0, b), t, (a, c, c0, b))
        self.busy = False
        self._next()

    def _advance(self, k: int, t0: float, s1: float, total: float, coef: tuple | None = None) -> None:
        """Apply k iterations (first one s1 long, all of them `total`) to the batch: record the TBT gaps and
        retire members whose last token came out."""
        r, tally, heap = self.reqs, self.tally, self.heap
        n, nf = len(heap), len(self.fresh)
        for rid in self.fresh:
            r.first_gap[rid] = t0 + s1 - r.first_tok[rid]
        self.fresh = []
        it0 = self.it
        self.it = it = it0 + k
        self.ctx += n * k
        if self.fusion or coef is None:
            # every member made k steps: one gap sample per segment (the within-segment spread is c·b a step)
            if n - nf:
                tally.gap_values.append(total / k)
                tally.gap_weights.append(float((n - nf) * k))
            if nf and k > 1:
                tally.gap_values.append((total - s1) / (k - 1))
                tally.gap_weights.append(float(nf * (k - 1)))
        join_it, on_done = self.join_it, self.cluster.on_done
        while heap and heap[0][0] <= it:
            end_it, rid = heapq.heappop(heap)
            steps = end_it - it0  # static batching: members leave at their own iteration
            end = t0 + (total if steps == k else seg_time(steps, *coef))
            r.finish[rid] = end
            r.gen[rid] += end_it - join_it.pop(rid)
            self.ctx -= r.prompt[rid] + r.gen[rid] + (it - end_it)
            self.kv_used -= r.prompt[rid] + r.output[rid]
            if not self.fusion and coef is not None and steps > 1:
                # a static batch is formed at once, so its first step gave every member its second token
                tally.gap_values.append((end - t0 - s1) / (steps - 1))
                tally.gap_weights.append(float(steps - 1))
            on_done(rid)
