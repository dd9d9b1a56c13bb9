"""One simulated worker: a prefill queue, a decode batch and the KV it holds (a prefill, decode or mixed worker;
Splitwise's prompt/token/mixed machine).

Speed: a decode batch is advanced over all the iterations until its membership next changes in ONE SimPy event.
Iteration i of a batch of b requests with total context C0 takes a + c·(C0 + i·b), so k iterations take
S(k) = k·a + c·(k·C0 + b·k(k-1)/2); an arrival that must join cuts the segment at the next iteration boundary.
Members are kept in a heap keyed by the worker iteration at which they finish, so a segment costs O(1) plus
O(log b) per member that joins or leaves: no per-token and no per-member work.

When the profile measured the in-cluster step's spread (sim/perf.py's `jitter`), every decode iteration's
duration is its profiled time times a seeded draw from that distribution, so the batch advances one iteration
per event and every gap is its own sample (the price of jitter is paid only by profiles that carry it).
"""

from __future__ import annotations

import heapq
import math
from collections import deque

import numpy as np

from services.contracts.layout import Batching
from services.contracts.routing import Load, Ranked
from sim.clock import Clock
from sim.kvlink import Fabric
from sim.perf import PerfModel
from sim.state import Requests, Tally


def seg_time(k: float, a: float, c: float, c0: float, b: int) -> float:
    return k * a + c * (k * c0 + b * k * (k - 1) / 2.0)  # (the hot paths below inline this very expression)


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


class Draws:
    """Seeded draws from an empirical distribution given by its inverse CDF (levels, values), by blocks."""

    __slots__ = ("rng", "levels", "values", "buf", "i")

    def __init__(self, dist: tuple[np.ndarray, np.ndarray], seed: tuple[int, ...]) -> None:
        self.rng = np.random.default_rng(seed)
        self.levels, self.values = dist
        self.buf: list[float] = []
        self.i = 0

    def __call__(self) -> float:
        if self.i == len(self.buf):
            self.buf = np.interp(self.rng.random(1024), self.levels, self.values).tolist()
            self.i = 0
        self.i += 1
        return self.buf[self.i - 1]


class Host:
    """The workers of one layout that share a machine (their pools' `host`, a mixed worker's prefill lane with
    its decode half), when the profile measured what they do to one another there (sim/perf.py's host rows):
    a prefill runs slower while requests decode beside it, a decode step while a prefill or other batches run.
    Each unit's speed is set when it starts (a decode segment is cut when a prefill starts or ends beside it)."""

    __slots__ = ("members",)

    def __init__(self) -> None:
        self.members: list[Worker] = []

    def decoding(self, me: Worker) -> tuple[int, int]:
        """(decode batches, requests in them) running on this host besides `me`'s."""
        n = s = 0
        for w in self.members:
            if w is not me and w.busy and w.seg[0] == "decode":
                n += 1
                s += len(w.heap)
        return n, s

    def prefilling(self, me: Worker) -> bool:
        return any(w is not me and w.busy and w.seg[0] == "prefill" for w in self.members)

    def retime_prefills(self, me: Worker) -> None:
        """A decode batch started or stopped: the running prefills go on at the new speed."""
        for w in self.members:
            if w is not me and w.pf is not None:
                w.retime_prefill()

    def retime(self, me: Worker) -> None:
        """A prefill started or ended: the running decode segments go on at the new speed from their next
        iteration."""
        for w in self.members:
            if w is not me and w.busy and w.seg[0] == "decode":
                w._cut()


class Worker:
    """Runs prefill batches, mixed iterations (prefill + one decode step) and multi-iteration decode segments."""

    # None: advance a fused batch to its next membership change in one event. 1: one event per iteration, the
    # way per-iteration simulators work (kept for the speed benchmark's side-by-side and for tests).
    segment_limit: int | None = None

    __slots__ = ("env", "idx", "role", "perf", "reqs", "tally", "cluster", "policy", "fusion", "max_batch",
                 "max_batch_tokens", "kv_cap", "kv_used", "dec_assigned", "prefill_q", "prefill_pending", "dec_wait",
                 "it", "heap", "fresh", "ctx", "busy", "pending", "seg", "kv_bytes", "layers",
                 "fabric", "layerwise", "mixed_overhead", "twin", "lane", "idle_w", "load", "rank", "rank_i",
                 "decode_times", "jitter", "covered", "host", "stalled", "pf", "early")

    def __init__(self, env: Clock, idx: int, role: str, perf: PerfModel, batching: Batching,
                 reqs: Requests, tally: Tally, cluster: object, kv_usable_fraction: float,
                 fabric: Fabric, *, kv_transfer: str = "layerwise", mixed_overhead: float = 0.0,
                 seed: int = 0) -> None:
        self.env, self.idx, self.role, self.perf, self.reqs, self.tally = env, idx, role, perf, reqs, tally
        self.cluster = cluster  # has .workers and .on_done(rid)
        self.policy = batching.policy
        self.fusion = batching.policy == "fusion"
        self.max_batch = 1 if batching.policy == "sequential" else batching.max_batch
        self.max_batch_tokens = batching.max_batch_tokens
        # perf.decode(b) by batch size b <= max_batch, filled as met (a list lookup instead of a call per segment)
        self.decode_times: list[tuple[float, float, float] | None] = [None] * (self.max_batch + 1)
        cap = perf.kv_capacity_tokens(kv_usable_fraction)
        if batching.kv_budget_mb is not None:
            cap = min(cap, int(batching.kv_budget_mb * 2**20 // perf.spec.kv_bytes_per_token))
        self.kv_cap = cap
        self.kv_used = 0  # tokens reserved by admitted decode requests (prompt + output, no preemption)
        self.dec_assigned = 0  # tokens of every request routed here for decode and not finished
        self.prefill_q: deque[int] = deque()
        self.prefill_pending = 0  # prompt tokens queued or in flight
        self.dec_wait: deque[int] = deque()
        self.it = 0  # decode iterations this worker has run
        self.heap: list[tuple[int, int]] = []  # (iteration at which the member finishes, rid)
        self.fresh: list[int] = []  # members that have not yet produced their second token
        self.ctx = 0  # total context of the active decode batch
        self.busy = False
        self.pending = -1  # the clock's sequence number of the running unit's end (a cut cancels it)
        self.seg: tuple = ()
        self.kv_bytes = perf.spec.kv_bytes_per_token
        self.layers = perf.spec.layers
        self.fabric = fabric
        self.layerwise = kv_transfer == "layerwise"
        self.mixed_overhead = mixed_overhead
        self.twin: Worker | None = None  # a mixed worker's decode half, when its phases run concurrently
        self.lane: Worker | None = None  # ... and, on that decode half, its prefill lane
        self.idle_w = perf.hw.power_idle_w
        # what the router ranks by (services.contracts.routing); KV counts every token routed here for decode
        self.load = Load(idx, kv_free_bytes=cap * self.kv_bytes, kv_total_bytes=cap * self.kv_bytes)
        self.rank: Ranked | None = None  # the router's pool holding self.load, at position rank_i (sim/cluster.py)
        self.rank_i = 0
        # the decode step's measured spread: one multiplier per iteration, seeded by the run's seed and this worker
        self.jitter = Draws(perf.jitter, (seed, idx)) if perf.jitter is not None and idx >= 0 else None
        # ... and, beside a prefill on its host, one drawn from the spread measured there (perf.host_covered)
        self.covered = np.random.default_rng((seed, idx, 1)) if self.jitter is not None \
            and perf.has_host_covered else None
        self.host: Host | None = None  # set by the cluster when this worker shares its machine (Host)
        self.stalled = 0.0  # what joins add to the running iteration (decode_join_stall_s), for its first-gap record
        # a prefill that follows its host's decode batches (perf.host_retime_prefill): (share done, when, its time
        # unslowed, its slowdown since then); and the requests whose KV landed before a lengthened prefill ended
        self.pf: tuple[float, float, float, float] | None = None
        self.early: set[int] = set()

    # -- inputs from the router / other workers -------------------------------------------------------------
    def add_prefill(self, rid: int) -> None:
        self.prefill_q.append(rid)
        self.prefill_pending += self.reqs.prompt[rid]
        load = self.load
        load.pending_prompt_tokens = self.prefill_pending
        load.waiting_requests += 1
        if self.rank is not None:  # Ranked.update, inlined
            self.rank.keys[self.rank_i] = self.rank.key(load)
        if not self.busy:  # _poke, inlined (once per request)
            self._next()
        elif self.fusion and self.seg[0] == "decode":
            self._cut()

    def assign_decode(self, need: int) -> None:
        """The router sent a request's decode phase here: reserve its KV share in the router's view."""
        self.dec_assigned += need
        load = self.load
        load.live_requests += 1
        load.kv_free_bytes = (self.kv_cap - self.dec_assigned) * self.kv_bytes
        if self.rank is not None:  # Ranked.update, inlined
            self.rank.keys[self.rank_i] = self.rank.key(load)

    def release_decode(self, need: int) -> None:
        self.dec_assigned -= need
        load = self.load
        load.live_requests -= 1
        load.kv_free_bytes = (self.kv_cap - self.dec_assigned) * self.kv_bytes
        if self.rank is not None:  # Ranked.update, inlined
            self.rank.keys[self.rank_i] = self.rank.key(load)

    def add_decode(self, rid: int) -> None:
        self.dec_wait.append(rid)
        if not self.busy:  # _poke, inlined
            self._next()
        elif self.fusion and self.seg[0] == "decode":
            self._cut()

    def _poke(self) -> None:
        if not self.busy:
            self._next()
        elif self.fusion and self.seg[0] == "decode":
            self._cut()

    # -- scheduling -----------------------------------------------------------------------------------------
    def _admit(self) -> None:
        if not self.dec_wait or (not self.fusion and self.heap):
            return
        r, heap, it, wait = self.reqs, self.heap, self.it, self.dec_wait
        prompt, output, gen = r.prompt, r.output, r.gen
        while wait and len(heap) < self.max_batch:
            rid = wait[0]
            need = prompt[rid] + output[rid]
            if self.kv_used + need > self.kv_cap and heap:
                break  # wait for memory; an empty worker always takes one (the router checked it fits)
            wait.popleft()
            self.kv_used += need
            heapq.heappush(heap, (it + output[rid] - gen[rid], rid))
            self.fresh.append(rid)
            self.ctx += prompt[rid] + gen[rid]

    def _next(self) -> None:
        """Start the next unit of work, if any (called when not busy)."""
        if self.fusion:
            if self.dec_wait:
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
        prompt, q = self.reqs.prompt, self.prefill_q
        batch: list[int] = []
        tokens = 0
        sum_sq = 0.0
        while q and len(batch) < self.max_batch:
            p = prompt[q[0]]
            if batch and tokens + p > self.max_batch_tokens:
                break
            batch.append(q.popleft())
            tokens += p
            sum_sq += float(p) * p
        b = len(self.heap)  # decode requests riding along (mixed iteration)
        if self.perf.prefill_padded and len(batch) > 1:  # our engine pads every prompt to the longest
            longest = max(prompt[rid] for rid in batch)
            t, watts = self.perf.prefill(len(batch) * longest + b, len(batch) * float(longest) * longest)
        else:
            t, watts = self.perf.prefill(tokens + b, sum_sq)
        twin, host = self.twin, self.host
        base = f = 0.0
        if host is not None:  # the machine's other workers: s requests decoding beside this prefill (measured)
            n, s = host.decoding(self)
            base, f = t, self.perf.host_prefill_slowdown(s, n)
            t *= f
            host.retime(self)  # ... and they run slower beside it from their next iteration
        elif twin is not None and twin.busy:  # a concurrent mixed worker: both threads share the process's cores
            t *= self.perf.mixed_prefill_slowdown
            if twin.seg and twin.seg[0] == "decode":
                twin._cut()  # its next decode segment runs beside this prefill, at the shared speed
        if b:
            # a mixed iteration: sim.mixed_overhead (splitwise-sim: 0.1) plus reading the decoders' KV
            t = t * (1.0 + self.mixed_overhead) + self._decode_time(b)[1] * self.ctx
        self.busy = True
        env = self.env
        now = env.now
        self.seg = seg = ("prefill", now, t, watts, batch, tokens)
        self.pending = env.call(t, self._end_prefill, seg)
        if host is not None and not b and self.perf.host_retime_prefill:
            self.pf = (0.0, now, base, f)
        self._push_kv(batch, now, t)

    def retime_prefill(self) -> None:
        """The host's decode batches changed: the running prefill goes on at the slowdown they now cause."""
        if self.pf is None or not self.busy or self.seg[0] != "prefill":
            return
        n, s = self.host.decoding(self)
        f = self.perf.host_prefill_slowdown(s, n)
        done, at, base, f0 = self.pf
        if f == f0:
            return
        now = self.env.now
        done = min(1.0, done + (now - at) / (base * f0))
        self.pf = (done, now, base, f)
        _, t0, _, watts, batch, tokens = self.seg
        left = (1.0 - done) * base * f
        self.seg = seg = ("prefill", t0, now + left - t0, watts, batch, tokens)
        self.env.cancel(self.pending)
        self.pending = self.env.call(left, self._end_prefill, seg)

    def _push_kv(self, batch: list[int], t0: float, t: float) -> None:
        """Start the KV transfers of the prompts that decode elsewhere (sim/kvlink.py): layer-wise from the
        first layer's end, or whole after the prefill."""
        r, workers, fabric, idx, twin = self.reqs, self.cluster.workers, self.fabric, self.idx, self.twin
        dests, output, prompt = r.dest, r.output, r.prompt
        for rid in batch:
            dest = dests[rid]
            if dest == idx or output[rid] <= 1 or workers[dest] is twin:
                continue
            nbytes = prompt[rid] * self.kv_bytes
            if self.layerwise:
                ready, floor = t0 + t / self.layers, t0 + t + nbytes / self.layers / fabric.link_Bps  # + alone_s
            else:
                ready = floor = t0 + t
            fabric.send(idx, dest, nbytes, ready, floor, self._landed, rid)

    def _decode_time(self, b: int) -> tuple[float, float, float]:
        hit = self.decode_times[b] = self.perf.decode(b)
        return hit

    def _start_decode(self) -> None:
        heap = self.heap
        b = len(heap)
        a, c, watts = self.decode_times[b] or self._decode_time(b)
        lane, host = self.lane, self.host
        drawn = False  # this step's factor beside a prefill was drawn from its measured spread
        if host is not None:  # its machine's prefills and other decode batches (measured slowdowns)
            n, s = host.decoding(self)
            pf = host.prefilling(self)
            if pf and self.covered is not None:
                levels, values = self.perf.host_covered(1 + n, b + s)
                f = self.perf.host_decode_slowdown(1 + n, b + s, False) * float(
                    np.interp(self.covered.random(), levels, values))
                drawn = True
            else:
                f = self.perf.host_decode_slowdown(1 + n, b + s, pf)
            if f != 1.0:
                a, c = a * f, c * f
        elif lane is not None and lane.busy:
            a, c = a * self.perf.mixed_decode_slowdown, c * self.perf.mixed_decode_slowdown
        if self.fusion:
            k = heap[0][0] - self.it
            if self.segment_limit is not None:
                k = min(k, self.segment_limit)
        else:
            k = max(heap)[0] - self.it
        c0 = self.ctx
        if self.jitter is not None:  # one iteration, its own duration: a profiled step times a measured multiplier
            k = 1
            t = (a + c * c0) * (1.0 if drawn else self.jitter())  # a drawn factor holds the step's own spread
        else:
            t = k * a + c * (k * c0 + b * k * (k - 1) / 2.0)  # seg_time(k, a, c, c0, b)
        stall = self.perf.decode_join_stall_s
        if stall > 0.0 and self.fresh and len(self.fresh) < b:
            # requests join a running batch in this iteration: it is longer for the members already in it; the
            # joiners' own first gaps end where the step would have (decode_join_s holds their part)
            if k > 1:
                k, t = 1, a + c * c0
            self.stalled = stall * len(self.fresh)
            t += self.stalled
            a, c = t, 0.0  # (a one-iteration segment of exactly t: a cut never shortens it)
        self.busy = True
        env = self.env
        self.seg = seg = ("decode", env.now, t, watts, k, a, c, c0, b)
        self.pending = env.call(t, self._end_decode, seg)
        if host is not None and self.perf.host_retime_prefill:
            host.retime_prefills(self)

    def _cut(self) -> None:
        """Something must join: end the running decode segment at the next iteration boundary."""
        _, t0, _, watts, k, a, c, c0, b = self.seg
        env = self.env
        now = env.now
        if c == 0.0 or b == 0:  # iters_done's closed case, inlined (profile decode times have no context term)
            i = int((now - t0) / a + 1e-9) + 1
        else:
            i = iters_done(now - t0, a, c, c0, b) + 1
        if i >= k:
            return
        t = i * a + c * (i * c0 + b * i * (i - 1) / 2.0)  # seg_time(i, a, c, c0, b)
        self.seg = seg = ("decode", t0, t, watts, i, a, c, c0, b)
        env.cancel(self.pending)  # the segment's old end: it never comes
        self.pending = env.call(t0 + t - now, self._end_decode, seg)

    # -- completions ----------------------------------------------------------------------------------------
    def _end_prefill(self, seg: tuple) -> None:
        _, t0, t, watts, batch, tokens = seg
        now = self.env.now
        self.tally.spans.append((t0, now, watts - self.idle_w))  # Tally.busy, inlined
        r = self.reqs
        self.prefill_pending -= tokens
        load = self.load
        load.pending_prompt_tokens = self.prefill_pending
        load.waiting_requests -= len(batch)
        if self.rank is not None:  # Ranked.update, inlined
            self.rank.keys[self.rank_i] = self.rank.key(load)
        if self.heap:  # the riding decode requests got one token each
            self._advance(1, t0, t, t)
        self.busy = False  # before handing requests on: a concurrent twin must see this lane idle
        self.pf = None
        first_tok, gen, output, dests, idx = r.first_tok, r.gen, r.output, r.dest, self.idx
        for rid in batch:
            first_tok[rid] = now
            gen[rid] += 1
            if output[rid] <= 1:
                r.finish[rid] = now
                self.cluster.on_done(rid)
            elif dests[rid] == idx:
                self.dec_wait.append(rid)
            elif self.twin is not None and self.cluster.workers[dests[rid]] is self.twin:
                self._join(rid)  # a concurrent mixed worker: no transfer
            elif self.early and rid in self.early:  # its KV landed while this prefill ran on, lengthened
                self.early.discard(rid)
                self._landed(rid)
            # else: its KV is on the way (_push_kv); _landed hands it to the destination
        if self.fusion:  # _next, inlined for the fused batch
            if self.dec_wait:
                self._admit()
            if self.prefill_q:
                self._start_prefill()
            elif self.heap:
                self._start_decode()
        else:
            self._next()
        if self.host is not None and not self.busy:
            self.host.retime(self)  # no prefill here any more: the host's decode batches speed up

    def _landed(self, rid: int) -> None:
        """A pushed KV arrived at its decode worker. Our runtime answers Prefill only now (tandem profile's
        first_token_after_kv), so the first token leaves here, not at the prefill's end."""
        if self.pf is not None and self.busy and self.seg[0] == "prefill" and rid in self.seg[4]:
            self.early.add(rid)  # the prefill was lengthened past its push: it hands the request over at its end
            return
        if self.perf.first_token_after_kv:
            self.reqs.first_tok[rid] = max(self.reqs.first_tok[rid], self.env.now)
        to = self.cluster.workers[self.reqs.dest[rid]]  # _join, inlined
        if self.perf.decode_join_s > 0:
            self.env.call(self.perf.decode_join_s, to.add_decode, rid)
        else:
            to.add_decode(rid)

    def _join(self, rid: int) -> None:
        """Hand the request to its decode worker after the runtime's join delay (Decode call, KV claim)."""
        to = self.cluster.workers[self.reqs.dest[rid]]
        if self.perf.decode_join_s > 0:
            self.env.call(self.perf.decode_join_s, to.add_decode, rid)
        else:
            to.add_decode(rid)

    def _end_decode(self, seg: tuple) -> None:
        _, t0, t, watts, k, a, c, c0, b = seg
        self.tally.spans.append((t0, self.env.now, watts - self.idle_w))  # Tally.busy, inlined
        # seg_time(1, ...) is exactly a + c·c0; a fused batch's members all leave at the segment's end (no coef)
        if self.stalled:  # a one-iteration segment that joiners lengthened for the members already there
            self._advance(1, t0, t - self.stalled, t)
            self.stalled = 0.0
        elif self.jitter is not None:  # a single drawn iteration: its gap is the whole segment
            self._advance(1, t0, t, t)
        else:
            self._advance(k, t0, a + c * c0, t, None if self.fusion else (a, c, c0, b))
        self.busy = False
        if self.fusion:  # _next, inlined for the fused batch
            if self.dec_wait:
                self._admit()
            if self.prefill_q:
                self._start_prefill()
            elif self.heap:
                self._start_decode()
        else:
            self._next()
        if self.host is not None and not self.busy and self.perf.host_retime_prefill:
            self.host.retime_prefills(self)  # this batch went idle

    def _advance(self, k: int, t0: float, s1: float, total: float, coef: tuple | None = None) -> None:
        """Apply k iterations (first one s1 long, all of them `total`) to the batch: record the TBT gaps and
        retire members whose last token came out."""
        r, heap, fresh = self.reqs, self.heap, self.fresh
        n, nf = len(heap), len(fresh)
        if nf:
            first_gap, first_tok, at = r.first_gap, r.first_tok, t0 + s1
            for rid in fresh:
                first_gap[rid] = at - first_tok[rid]
            self.fresh = []
        it0 = self.it
        self.it = it = it0 + k
        self.ctx += n * k
        if self.fusion or coef is None:
            # every member made k steps: one gap sample per segment (the within-segment spread is c·b a step)
            if n - nf:
                self.tally.gaps.append((total / k, (n - nf) * k))
            if nf and k > 1:
                self.tally.gaps.append(((total - s1) / (k - 1), nf * (k - 1)))
        if not heap or heap[0][0] > it:
            return
        on_done = self.cluster.on_done
        while heap and heap[0][0] <= it:
            end_it, rid = heapq.heappop(heap)
            steps = end_it - it0  # static batching: members leave at their own iteration
            end = t0 + (total if steps == k else seg_time(steps, *coef))
            r.finish[rid] = end
            r.gen[rid] = r.output[rid]  # end_it was set so that it is exactly the last token
            self.ctx -= r.prompt[rid] + r.gen[rid] + (it - end_it)
            self.kv_used -= r.prompt[rid] + r.output[rid]
            if not self.fusion and coef is not None and steps > 1:
                # a static batch is formed at once, so its first step gave every member its second token
                self.tally.gaps.append(((end - t0 - s1) / (steps - 1), steps - 1))
            on_done(rid)

