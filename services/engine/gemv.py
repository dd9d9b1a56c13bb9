"""Which kernel runs each projection of the decode step, per batch bucket: cuBLAS or `kernels.skinny_linear`.

A decode projection at batch <= 64 is a matrix-vector product in all but name: its time is the time to read the
weights once. cuBLAS reads the large ones near the copy bandwidth but gives the 8-12 MB ones (q/k/v, o at 1B
shapes) only 32-48 thread blocks, half the bandwidth (docs/gpu.md). `skinny_linear` splits K so that every
projection fills the chip, hands float32 partials to the kernel that consumes the product anyway (rope_kv,
add_rmsnorm, silu_mul: no extra kernel), and can fuse SiLU(gate) * up into the gate/up projection (one kernel
less per layer).

Modes: "off" (cuBLAS everywhere: the step as it was), "on" (the Triton kernel wherever its shape rules allow,
with a fixed heuristic configuration), "auto" (the default: at graph-capture time, each candidate of each
projection, cuBLAS included, is checked against cuBLAS's product and timed inside a CUDA graph over every
layer's weights, with the kernel that consumes its output; the fastest correct one is kept). "auto" considers
the Triton kernel for 16-bit weights only: for float32 it keeps cuBLAS.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch

from services.engine.fused import FusedModel

UNITS = ("qkv", "o", "mlp_in", "down", "head")
MODES = ("auto", "on", "off")
# (bn, bk, num_warps, num_stages): few, so that the first capture compiles little
CONFIGS = ((64, 128, 4, 3), (128, 128, 4, 3), (32, 256, 4, 3))
SILU_CONFIGS = ((64, 128, 4, 3), (32, 128, 4, 3))
NARROW = (64, 64, 4, 4)  # for a K that 128 does not divide (SmolLM2's 576)
MAX_ROWS = 64  # kernels.SKINNY_MAX_ROWS (not imported: this module loads without Triton)


@dataclass(frozen=True, slots=True)
class Choice:
    kernel: str = "cublas"  # "cublas" | "skinny"
    bn: int = 0
    bk: int = 0
    split: int = 1
    warps: int = 4
    stages: int = 3
    silu: bool = False  # mlp_in: SiLU * up in the projection's epilogue (else silu_mul sums its partials)

    def label(self) -> str:
        if self.kernel == "cublas":
            return "cublas"
        return (f"skinny bn{self.bn} bk{self.bk} split{self.split} w{self.warps} s{self.stages}"
                + (" silu" if self.silu else ""))


@dataclass(slots=True)
class Plan:
    rows: int
    mode: str
    choices: dict[str, Choice]
    timings_us: dict[str, dict[str, float]]  # unit -> candidate label -> us per layer (auto only)
    rejected: dict[str, dict[str, str]]  # unit -> candidate label -> why (a failed launch or a wrong product)

    def summary(self) -> dict[str, Any]:
        return {"rows": self.rows, "mode": self.mode, "choices": {u: c.label() for u, c in self.choices.items()},
                "timings_us": self.timings_us, "rejected": self.rejected}


def unit_shape(fm: FusedModel, unit: str) -> tuple[int, int]:
    """(N, K) of the unit's weight matrix (mlp_in: the fused [gate | up])."""
    lw = fm.layers[0]
    w = {"qkv": lw.wqkv, "o": lw.wo, "mlp_in": lw.wgu, "down": lw.wdown, "head": fm.lm_head}[unit]
    return w.shape[0], w.shape[1]


def _splits(n_blocks: int, k: int, bk: int, sms: int) -> list[int]:
    """Split-K factors that divide K into bk steps: the smallest two that give at least one program per SM."""
    ok = [s for s in (1, 2, 4, 8, 16) if k % (bk * s) == 0]
    enough = [s for s in ok if n_blocks * s >= sms]
    return enough[:2] if enough else ok[-1:]


def candidates(fm: FusedModel, unit: str, rows: int, sms: int) -> list[Choice]:
    """The Triton candidates of a unit at this many rows (cuBLAS is always a candidate besides)."""
    if rows > MAX_ROWS or (unit == "qkv" and fm.layers[0].bqkv is not None):
        return []
    n, k = unit_shape(fm, unit)
    out: list[Choice] = []
    configs = CONFIGS if k % 128 == 0 else (NARROW,)
    for bn, bk, warps, stages in configs:
        if k % bk:
            continue
        blocks = -(-n // bn)
        if unit == "head":  # rounded straight into the logits buffer: no partials
            out.append(Choice("skinny", bn, bk, 1, warps, stages))
            continue
        out += [Choice("skinny", bn, bk, s, warps, stages) for s in _splits(blocks, k, bk, sms)]
    if unit == "mlp_in":
        out += [Choice("skinny", bn, bk, 1, warps, stages, silu=True)
                for bn, bk, warps, stages in (SILU_CONFIGS if k % 128 == 0 else (NARROW,)) if k % bk == 0]
    return out


def heuristic(fm: FusedModel, unit: str, rows: int, sms: int) -> Choice:
    """Mode "on": the Triton kernel with bn 64, the largest bk (<= 128) dividing K and the split that gives about
    two programs per SM; SiLU fused into mlp_in. cuBLAS where the kernel does not apply."""
    n, k = unit_shape(fm, unit)
    bk = next((b for b in (128, 64, 32, 16) if k % b == 0), 0)
    if rows > MAX_ROWS or not bk or (unit == "qkv" and fm.layers[0].bqkv is not None):
        return Choice()
    if unit in ("head", "mlp_in"):
        return Choice("skinny", 64, bk, 1, silu=unit == "mlp_in")
    blocks = -(-n // 64)
    split = 1
    while blocks * split < 2 * sms and k % (bk * split * 2) == 0 and split < 16:
        split *= 2
    return Choice("skinny", 64, bk, split)


def projection(unit: str, c: Choice, base: SimpleNamespace) -> Callable[..., torch.Tensor]:
    """The ops-table function of a unit for a choice (`base`: the cuBLAS table, triton_ops(pdl))."""
    if c.kernel == "cublas":
        return getattr(base, unit)
    from services.engine import kernels

    kw = {"bn": c.bn, "bk": c.bk, "num_warps": c.warps, "num_stages": c.stages, "pdl": getattr(base, "pdl", False)}
    if unit == "qkv":
        return lambda h, w, b: kernels.skinny_linear(h, w, split=c.split, **kw)
    if unit in ("o", "down"):
        return lambda x, w: kernels.skinny_linear(x, w, split=c.split, **kw)
    if unit == "mlp_in":
        if c.silu:
            return lambda h, w: kernels.skinny_linear(h, w, silu=True, **kw)
        return lambda h, w: base.silu_mul(kernels.skinny_linear(h, w, split=c.split, **kw), h.dtype)
    if unit == "head":
        return lambda h, w, out=None: kernels.skinny_linear(h, w, partials=False, out=out, **kw)
    raise ValueError(f"unknown projection {unit!r}")


def bind(choices: dict[str, Choice], base: SimpleNamespace) -> SimpleNamespace:
    ops = SimpleNamespace(**vars(base))
    for unit, c in choices.items():
        setattr(ops, unit, projection(unit, c, base))
    return ops


_PLANS: dict[tuple, Plan] = {}  # by shapes, dtype, device, rows, mode: the choice depends on nothing else


def plan_for(fm: FusedModel, rows: int, mode: str, k_cache: torch.Tensor, v_cache: torch.Tensor, sms: int,
             base: SimpleNamespace) -> Plan:
    """The projections' kernels for `rows`-row steps (k_cache/v_cache [L, S, C, Hkv, D]: rope_kv's targets while
    timing; every timed row is padding, so nothing is written)."""
    if mode not in MODES:
        raise ValueError(f"gemv mode must be one of {', '.join(MODES)} (got {mode!r})")
    key = (tuple(unit_shape(fm, u) for u in UNITS), len(fm.layers), fm.lm_head.dtype, str(fm.lm_head.device), rows,
           mode, fm.layers[0].bqkv is not None)
    if key in _PLANS:
        return _PLANS[key]
    if mode == "off":
        plan = Plan(rows, mode, {u: Choice() for u in UNITS}, {}, {})
    elif mode == "on":
        plan = Plan(rows, mode, {u: heuristic(fm, u, rows, sms) for u in UNITS}, {}, {})
    else:
        plan = _measure(fm, rows, k_cache, v_cache, sms, base)
    _PLANS[key] = plan
    return plan


def _measure(fm: FusedModel, rows: int, k_cache: torch.Tensor, v_cache: torch.Tensor, sms: int,
             base: SimpleNamespace) -> Plan:
    dt, dev = fm.lm_head.dtype, fm.lm_head.device
    plan = Plan(rows, "auto", {u: Choice() for u in UNITS}, {}, {})
    if dt not in (torch.bfloat16, torch.float16):
        return plan
    g = torch.Generator(device=dev).manual_seed(0)
    dim, hq = fm.layers[0].wo.shape[0], fm.layers[0].wo.shape[1]
    hid = fm.layers[0].wdown.shape[1]

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, device=dev, dtype=torch.float32).to(dt)

    h, attn, m, x = rand(rows, dim), rand(rows, hq), rand(rows, hid), rand(rows, dim)
    pos = torch.full((rows,), -1, dtype=torch.int64, device=dev)  # padding: rope_kv writes no KV
    slot = torch.arange(rows, device=dev)
    logits = torch.empty(rows, fm.lm_head.shape[0], device=dev, dtype=dt)
    layers = fm.layers

    def loop(unit: str, f: Callable[..., torch.Tensor]) -> Callable[[], None]:
        """Every layer's projection and its consumer, as in the step (the head: four times its one matrix)."""
        def run() -> None:
            for i, lw in enumerate(layers if unit != "head" else range(4)):
                if unit == "qkv":
                    base.rope_kv(f(h, lw.wqkv, lw.bqkv), pos, slot, fm.cos, fm.sin, k_cache[i], v_cache[i],
                                 fm.n_heads, fm.n_kv)
                elif unit == "o":
                    base.add_rmsnorm(x, f(attn, lw.wo), lw.post_norm, fm.eps)
                elif unit == "mlp_in":
                    f(h, lw.wgu)
                elif unit == "down":
                    base.add_rmsnorm(x, f(m, lw.wdown), lw.in_norm, fm.eps)
                else:
                    f(h, fm.lm_head, logits)
        return run

    def product(unit: str, f: Callable[..., torch.Tensor]) -> torch.Tensor:
        """The unit's product on layer 0, float32 (partials summed)."""
        lw = layers[0]
        y = {"qkv": lambda: f(h, lw.wqkv, lw.bqkv), "o": lambda: f(attn, lw.wo), "mlp_in": lambda: f(h, lw.wgu),
             "down": lambda: f(m, lw.wdown), "head": lambda: f(h, fm.lm_head, logits)}[unit]()
        return (y.sum(0) if y.dim() == 3 else y).float()

    per = {"head": 4}
    for unit in UNITS:
        cands = candidates(fm, unit, rows, sms)
        if not cands:
            continue
        ref = product(unit, getattr(base, unit))
        times: dict[str, float] = {}
        rejected: dict[str, str] = {}
        best, best_t = Choice(), float("inf")
        for c in [Choice(), *cands]:
            f = projection(unit, c, base)
            try:
                if c.kernel != "cublas":
                    got = product(unit, f)
                    err = float((got - ref).norm() / ref.norm().clamp_min(1e-30))
                    if not err < 2e-2:
                        rejected[c.label()] = f"relative error {err:.3g} against cuBLAS"
                        continue
                t = _graph_time_us(loop(unit, f), dev) / per.get(unit, len(layers))
            except Exception as e:  # noqa: BLE001 - a config the GPU cannot run (shared memory...) is skipped
                rejected[c.label()] = f"{type(e).__name__}: {str(e)[:160]}"
                continue
            times[c.label()] = round(t, 2)
            if t < best_t:
                best, best_t = c, t
        plan.choices[unit] = best
        plan.timings_us[unit] = times
        if rejected:
            plan.rejected[unit] = rejected
    return plan


def _graph_time_us(fn: Callable[[], None], dev: torch.device, reps: int = 25) -> float:
    """Median device time of fn() captured in a CUDA graph (compiled and warmed up first), in microseconds."""
    side = torch.cuda.Stream(dev)
    side.wait_stream(torch.cuda.current_stream(dev))
    with torch.cuda.stream(side):
        fn()
        fn()
    torch.cuda.current_stream(dev).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
        fn()
    graph.replay()
    ev = [torch.cuda.Event(enable_timing=True) for _ in range(reps + 1)]
    ev[0].record()
    for e in ev[1:]:
        graph.replay()
        e.record()
    ev[-1].synchronize()
    out = statistics.median(a.elapsed_time(b) for a, b in zip(ev, ev[1:], strict=False)) * 1e3
    del graph
    return out
