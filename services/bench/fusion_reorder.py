"""What buffer reordering costs and buys: one slot move vs one fused step, dense view vs gathered slots."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from services.engine import Engine


def _median_s(fn: Callable[[], object], repeat: int, sync: Callable[[], None]) -> float:
    times = []
    for _ in range(repeat):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def reorder_costs(engine: Engine, batch: int, ctx: int, repeat: int = 5) -> dict:
    """Times on a buffer of 2*batch slots, each live row holding `ctx` tokens.

    dense: live rows are slots 0..batch-1 (what compaction keeps), the step reads views of the buffer.
    gathered: live rows are every other slot (holes left in place), the step gathers them by index.
    move: one slot copied into a hole (kv.move), the cost Flover's reordering pays per finished request.
    """
    kv = engine.new_kv(2 * batch, ctx + 1)
    sync = torch.cuda.synchronize if engine.device.type == "cuda" else (lambda: None)
    tokens = [1] * batch
    scattered = torch.arange(0, 2 * batch, 2, device=engine.device)

    def set_lengths() -> None:
        for s in range(2 * batch):
            kv.lengths[s] = ctx - 1

    def dense() -> None:
        set_lengths()
        engine.decode(tokens, kv, slice(0, batch))

    def gathered() -> None:
        set_lengths()
        engine.decode(tokens, kv, scattered)

    def move() -> None:
        kv.lengths[1] = ctx
        kv.move(1, 0)

    dense(), gathered()  # first calls allocate
    step_dense = _median_s(dense, repeat, sync)
    step_gathered = _median_s(gathered, repeat, sync)
    move_s = _median_s(move, repeat * 4, sync)
    return {"batch": batch, "context": ctx, "step_dense_s": step_dense, "step_gathered_s": step_gathered,
            "gathered_over_dense": step_gathered / step_dense, "move_s": move_s, "move_over_step": move_s / step_dense,
            "move_bytes": 2 * engine.cfg.n_layers * ctx * engine.cfg.n_kv_heads * engine.cfg.head_dim
            * kv.k.element_size()}
