"""CUDA-graphed decode: one graph per batch-size bucket over the caller's KV buffer, replayed every step.

A step costs the host one small pinned copy (tokens and positions of the live rows) and one graph launch,
whatever the batch or the depth. Rows past the live batch up to the bucket are padding (position -1): the
kernels skip them. Graphs hold the KV buffer's addresses, so a new or reallocated buffer is captured anew.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from types import SimpleNamespace

import torch

from services.engine import gemv
from services.engine.fused import PDL_LATE, FusedModel, decode_step, fuse_weights, prefill_step, triton_ops
from services.engine.kv import KVBuffer
from services.engine.model import Transformer

BUCKETS = (1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64)


def bucket_for(n: int) -> int:
    """The smallest bucket holding n rows: the table above, then multiples of 32."""
    if n < 1:
        raise ValueError(f"a decode step needs at least one row (got {n})")
    for b in BUCKETS:
        if n <= b:
            return b
    return -(-n // 32) * 32


ATTN_MODES = ("tuned", "legacy")


def attn_splits(rows: int, n_kv: int, sms: int) -> int:
    """Key splits per (row, KV head) for about two attention programs per multiprocessor (a power of 2, <= 16)."""
    want = -(-2 * sms // max(1, rows * n_kv))
    return min(16, 1 << (want - 1).bit_length())


def attn_tiles(rows: int, n_kv: int, sms: int, mode: str = "tuned") -> dict:
    """How the step's attention kernel runs for `rows` rows: key splits, keys per tile, pipeline stages, grid order.

    "tuned" (measured on an H200, Llama-3.2-1B shapes at 1 024 and 4 096 tokens: docs/gpu.md): with fewer
    (row, KV head) pairs than half the multiprocessors, key splits as attn_splits says and 64-key tiles, two stages;
    from there on one program per pair streams all its keys (no split, no reduce kernel), three stages deep, in
    128-key tiles while there are at most two pairs per multiprocessor (64-key tiles above, so that four programs
    fit on one); the KV heads of a row are neighbouring programs. "legacy": the step before that (attn_splits,
    64-key tiles, two stages, a (rows, Hkv, splits) grid)."""
    if mode not in ATTN_MODES:
        raise ValueError(f"attention mode must be one of {', '.join(ATTN_MODES)} (got {mode!r})")
    pairs = rows * n_kv
    if mode == "legacy":
        return {"splits": attn_splits(rows, n_kv, sms), "block_n": 64, "num_stages": 2, "hk_fast": False}
    if 2 * pairs < sms:
        return {"splits": attn_splits(rows, n_kv, sms), "block_n": 64, "num_stages": 2, "hk_fast": True}
    return {"splits": 1, "block_n": 128 if pairs <= 2 * sms else 64, "num_stages": 3, "hk_fast": True}


@dataclass(slots=True)
class _Graph:
    rows: int
    inp: torch.Tensor  # [3, rows] int64 on the device: tokens, positions, slots
    logits: torch.Tensor  # [rows, V] in the model's dtype
    graph: torch.cuda.CUDAGraph


class DecodeGraphs:
    """Owns the fused weights, the graphs of the current KV buffer, and the pinned staging of step inputs.

    `gemv_mode`: how each bucket's projections pick their kernel (services.engine.gemv: "auto" measures at the
    bucket's first capture, "on" forces the Triton skinny kernel where it applies, "off" keeps cuBLAS).
    `pdl`: launch the step's Triton kernels with programmatic dependent launch (each kernel's launch overlaps
    the one before it; fused.PDL_LATE: the projections and attention let the next kernel launch only after their
    main loop); None tries without, with, and late. `fuse_rope`: RoPE and the KV write inside the attention kernel
    (kernels.rope_attention), else a kernel of their own before it. `attn`: how attention is tiled (attn_tiles).

    At a bucket's first capture, every variant of the step (the measured projection plan and, in "auto", the
    "on" heuristic plan, each with every PDL setting `pdl` allows) is captured and replayed in turns, and the
    graph with the fastest replay is kept: `step_choice[b]` records which and the replay times."""

    def __init__(self, model: Transformer, gemv_mode: str = "auto", pdl: bool | None = None,
                 fuse_rope: bool = True, attn: str = "tuned") -> None:
        if gemv_mode not in gemv.MODES:
            raise ValueError(f"gemv mode must be one of {', '.join(gemv.MODES)} (got {gemv_mode!r})")
        attn_tiles(1, 1, 1, attn)  # refuses an unknown mode here, not at the first capture
        self.attn = attn
        self.fused: FusedModel = fuse_weights(model)
        self.device = self.fused.embed.device
        self.ops_by_pdl = {p: triton_ops(pdl=p, fuse_rope=fuse_rope) for p in (False, True, PDL_LATE)}
        self.ops = self.ops_by_pdl[False]
        self.gemv_mode = gemv_mode
        self.pdl = pdl
        self.plans: dict[int, gemv.Plan] = {}
        self.step_choice: dict[int, dict] = {}  # bucket -> {"plan", "pdl", "choices"[, "replay_us"]}
        self.sms = torch.cuda.get_device_properties(self.device).multi_processor_count
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: dict[int, _Graph] = {}
        self.kv_key: tuple | None = None
        self.stage: list[torch.Tensor] = []
        self.stage_done: list[torch.cuda.Event] = []
        self.flip = 0
        self.captures = 0
        self.replays = 0

    def decode(self, tokens: list[int], kv: KVBuffer) -> torch.Tensor:
        """Engine.decode for the dense rows 0..len(tokens)-1: float32 logits [n, V]; kv.lengths advance by one."""
        n = len(tokens)
        key = (kv.k.data_ptr(), kv.v.data_ptr(), tuple(kv.k.shape), kv.k.dtype)
        if key != self.kv_key:
            self.graphs.clear()
            self.pool = torch.cuda.graph_pool_handle()  # the old pool dies with its last graph
            self.kv_key = key
        lengths = kv.lengths[:n]
        top = max(lengths)
        if top >= kv.capacity:
            kv.reserve(0, top + 1)  # raises with a clear message
        b = bucket_for(n)
        g = self.graphs.get(b) or self._capture(b, kv)
        stage = self._stage(b)
        stage[0, :n] = torch.tensor(tokens, dtype=torch.int64)
        stage[1, :n] = torch.tensor(lengths, dtype=torch.int64)
        stage[0, n:b], stage[1, n:b] = 0, -1
        g.inp[:2].copy_(stage[:, :b], non_blocking=True)
        self.stage_done[self.flip].record()
        g.graph.replay()
        kv.lengths[:n] = [x + 1 for x in lengths]
        self.replays += 1
        out = g.logits[:n]
        return out.float() if out.dtype != torch.float32 else out.clone()

    def prefill(self, tokens: torch.Tensor, kv: KVBuffer, slots: list[int], lens: list[int],
                on_layer: Callable[[int], None] | None = None) -> torch.Tensor:
        """Engine.prefill on the fused weights (no graph: prompt shapes vary); logits [B, V] in the model's dtype."""
        t = tokens.shape[1]
        for s in slots:
            kv.reserve(s, t)  # slot in range and the prompt fits: the kernels do not bounds-check
        dev = self.device
        slot_t = torch.tensor(slots, device=dev)
        last = torch.tensor([n - 1 for n in lens], device=dev)
        logits = prefill_step(self.fused, self.ops, tokens, slot_t, last, kv.k, kv.v, on_layer)
        for s, n in zip(slots, lens, strict=True):
            kv.lengths[s] = n
        return logits

    def _stage(self, b: int) -> torch.Tensor:
        """A pinned [2, >= b] buffer whose previous copy has finished (two alternate, so the host runs ahead)."""
        if not self.stage or self.stage[0].shape[1] < b:
            self.stage = [torch.empty(2, max(b, 64), dtype=torch.int64, pin_memory=True) for _ in range(2)]
            self.stage_done = [torch.cuda.Event() for _ in range(2)]
            for ev in self.stage_done:
                ev.record()
        self.flip ^= 1
        self.stage_done[self.flip].synchronize()
        return self.stage[self.flip]

    def ops_for(self, b: int, kv: KVBuffer, pdl: bool = False) -> SimpleNamespace:
        """The ops table of bucket b: the Triton kernels, with each projection's kernel from the bucket's plan."""
        if b not in self.plans:
            self.plans[b] = gemv.plan_for(self.fused, b, self.gemv_mode, kv.k, kv.v, self.sms, self.ops)
        return gemv.bind(self.plans[b].choices, self.ops_by_pdl[pdl])

    def _variants(self, b: int, kv: KVBuffer) -> list[tuple[str, dict, bool]]:
        """(plan name, projection choices, pdl) of every step variant to capture for bucket b."""
        self.ops_for(b, kv)
        plans = {self.gemv_mode: self.plans[b].choices}
        if self.gemv_mode == "auto":
            on = gemv.plan_for(self.fused, b, "on", kv.k, kv.v, self.sms, self.ops).choices
            if on != plans["auto"]:
                plans["on"] = on
        pdls = [False, True, PDL_LATE] if self.pdl is None else [self.pdl]
        return [(name, choices, pdl) for name, choices in plans.items() for pdl in pdls]

    def _capture(self, b: int, kv: KVBuffer) -> _Graph:
        fm = self.fused
        inp = torch.zeros(3, b, dtype=torch.int64, device=self.device)
        inp[1] = -1  # warm-up and capture run as padding: they write no KV
        inp[2] = torch.arange(b, device=self.device)
        logits = torch.empty(b, fm.lm_head.shape[0], dtype=fm.lm_head.dtype, device=self.device)
        tiles = attn_tiles(b, fm.n_kv, self.sms, self.attn)
        splits = tiles.pop("splits")

        def capture(choices: dict, pdl: bool | int) -> torch.cuda.CUDAGraph:
            ops = gemv.bind(choices, self.ops_by_pdl[pdl])
            ops.rope_attention = partial(ops.rope_attention, **tiles)

            def step() -> None:
                decode_step(fm, ops, inp[0], inp[1], inp[2], kv.k, kv.v, splits, out=logits)
            return _graph_of(step, self.device, self.pool)

        variants = self._variants(b, kv)
        graphs: list[torch.cuda.CUDAGraph] = []
        kept: list[tuple[str, dict, bool]] = []
        errors: dict[str, str] = {}
        for name, choices, pdl in variants:
            try:
                graphs.append(capture(choices, pdl))
                kept.append((name, choices, pdl))
            except Exception as e:  # noqa: BLE001 - e.g. a Triton or driver without programmatic dependent launch
                if not pdl or len(variants) == 1:
                    raise
                errors[name + _pdl_label(pdl)] = f"{type(e).__name__}: {str(e)[:160]}"
        # timed as captured: every row padding, so nothing is written to the KV buffer
        times = _replay_us(graphs) if len(graphs) > 1 else [float("nan")]
        best = min(range(len(graphs)), key=lambda i: times[i])
        name, choices, pdl = kept[best]
        graph = graphs[best]
        choice: dict = {"plan": name, "pdl": pdl, "choices": {u: c.label() for u, c in choices.items()}}
        if len(graphs) > 1:
            choice["replay_us"] = {n + _pdl_label(p): round(t, 1) for (n, _, p), t in zip(kept, times, strict=True)}
        if errors:
            choice["errors"] = errors
        del graphs
        self.step_choice[b] = choice
        self.graphs[b] = g = _Graph(b, inp, logits, graph)
        self.captures += 1
        return g


def _pdl_label(pdl: bool | int) -> str:
    return " pdl late" if pdl == PDL_LATE else " pdl" if pdl else ""


def _replay_us(graphs: list[torch.cuda.CUDAGraph], rounds: int = 5, reps: int = 8) -> list[float]:
    """Median replay time of each graph, in microseconds, the graphs timed in turns."""
    times: list[list[float]] = [[] for _ in graphs]
    for _ in range(rounds):
        for g, t in zip(graphs, times, strict=True):
            g.replay()
            t.append(replay_us(g, reps))
    return [sorted(t)[len(t) // 2] for t in times]


def replay_us(graph: torch.cuda.CUDAGraph, reps: int) -> float:
    """Mean time of `reps` back-to-back replays of a graph, in microseconds, by CUDA events."""
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(reps):
        graph.replay()
    b.record()
    b.synchronize()
    return a.elapsed_time(b) * 1e3 / reps


def _graph_of(step: Callable[[], None], device: torch.device, pool: tuple) -> torch.cuda.CUDAGraph:
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(2):  # compiles the Triton kernels and settles cuBLAS's choices before capture
            step()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
        step()
    return graph
