"""Latency and power of one machine running one model: an analytic roofline, or a measured profile table.

Decode iterations are linear in the batch's total context, t = a(b) + c·C, so a batch can be advanced over many
iterations in closed form (see sim/worker.py).
"""

from __future__ import annotations

import bisect
import csv
import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from services.contracts.errors import InvalidArgument
from sim.catalog import Hardware, ModelShape

# Share of dynamic power drawn by memory-bound work relative to compute-bound work. Assumption, chosen so a
# decode batch stays under a 70% cap (Splitwise: capping an H100's token phase barely slows it).
MEMORY_POWER_WEIGHT = 0.6


@dataclass(slots=True)
class ProfileTable:
    """splitwise_perf_model.csv rows for one (model, hardware): prompt time by batch tokens, token time by batch."""

    prompt_tokens: list[float]
    prompt_s: list[float]
    batch: list[float]
    token_s: list[float]


def _interp(x: float, xs: list[float], ys: list[float]) -> float:
    """Piecewise-linear, extrapolating linearly past both ends (more tokens cost more, never a plateau).
    Pure Python: it runs once per simulated batch, where numpy's call overhead dominates."""
    i = bisect.bisect_right(xs, x) - 1
    i = min(max(i, 0), len(xs) - 2)
    y = ys[i] + (ys[i + 1] - ys[i]) * (x - xs[i]) / (xs[i + 1] - xs[i])
    return max(y, ys[0] * 0.5)


@lru_cache(maxsize=16)
def _read_profile_rows(path: str) -> tuple[dict[str, str], ...]:
    p = Path(path)
    if not p.is_file():
        raise InvalidArgument(f"sim.perf_model: profile table not found: {p}", param="sim.perf_model")
    with p.open(newline="") as f:
        reader = csv.DictReader(f)
        need = {"model", "hardware", "prompt_size", "batch_size", "prompt_time", "token_time"}
        missing = need - set(reader.fieldnames or [])
        if missing:
            raise InvalidArgument(f"{p}: missing columns {sorted(missing)}", param="sim.perf_model")
        return tuple(reader)


def load_profile(path: str | Path, model_name: str, hw_name: str, tensor_parallel: int = 8,
                 decode_time_by: str = "batch") -> ProfileTable:
    """Average repeated runs; prompt time keyed by prompt_size x batch_size, token time by batch_size.

    decode_time_by="batch_tokens" keys token time by prompt_size x batch_size as well (median of the runs), as
    splitwise-sim's predictor does; it is then queried with the decode batch size, below the table's smallest
    key, so a decode iteration costs about the batch-1 time at any batch size (35.5 ms for BLOOM on an H100,
    where the profile measured 63.8 ms at batch 64)."""
    rows = [r for r in _read_profile_rows(str(path))
            if r["model"] == model_name and r["hardware"] == hw_name
            and int(r.get("tensor_parallel") or tensor_parallel) == tensor_parallel]
    if not rows:
        raise InvalidArgument(f"sim.perf_model: {path} has no rows for model {model_name!r} on {hw_name!r} "
                              f"(tensor_parallel={tensor_parallel})", param="sim.perf_model")
    prompt: dict[int, list[float]] = {}
    token: dict[int, list[float]] = {}
    for n, r in enumerate(rows, start=2):
        try:
            ps, bs = int(r["prompt_size"]), int(r["batch_size"])
            pt, tt = float(r["prompt_time"]) / 1e3, float(r["token_time"]) / 1e3
        except ValueError as exc:
            raise InvalidArgument(f"{path}: row {n}: {exc}", param="sim.perf_model") from None
        prompt.setdefault(ps * bs, []).append(pt)
        token.setdefault(ps * bs if decode_time_by == "batch_tokens" else bs, []).append(tt)
    if len(prompt) < 2 or len(token) < 2:
        raise InvalidArgument(f"sim.perf_model: {path} needs at least two prompt sizes and two batch sizes for "
                              f"{model_name} on {hw_name}", param="sim.perf_model")
    pk, tk = sorted(prompt), sorted(token)
    reduce = np.median if decode_time_by == "batch_tokens" else np.mean
    return ProfileTable([float(k) for k in pk], [float(np.mean(prompt[k])) for k in pk],
                        [float(k) for k in tk], [float(reduce(token[k])) for k in tk])


class PerfModel:
    """Prefill time, decode coefficients and power for (hardware, model), optionally power-capped."""

    def __init__(self, hw: Hardware, spec: ModelShape, *, profile: ProfileTable | None = None,
                 power_cap_w: float | None = None, capped: ProfileTable | None = None,
                 capped_w: float | None = None) -> None:
        self.hw, self.spec, self.profile = hw, spec, profile
        self.cap_w = power_cap_w if power_cap_w is not None and power_cap_w < hw.power_peak_w else None
        if self.cap_w is not None and self.cap_w <= hw.power_idle_w:
            raise InvalidArgument(f"power_cap_w: {power_cap_w} W is not above {hw.name}'s idle power "
                                  f"{hw.power_idle_w:.0f} W", param="power_cap_w")
        # measured capped rows (profile mode) are used at their cap and interpolated between it and no cap;
        # the analytic law (_power_and_slowdown) is the labelled fallback everywhere else
        self._capped: ProfileTable | None = None
        self._cap_mix = 0.0
        self.cap_basis: str | None = None
        if self.cap_w is not None:
            self.cap_basis = "analytic (fallback: no measured capped rows)"
            if profile is not None and capped is not None and capped_w is not None:
                if self.cap_w >= capped_w * 0.99:
                    self._capped = capped
                    self._cap_mix = min(1.0, (hw.power_peak_w - self.cap_w) / (hw.power_peak_w - capped_w))
                    self.cap_basis = ("measured" if self._cap_mix >= 0.99 else
                                      f"measured (interpolated {self._cap_mix:.2f} of the way to the "
                                      f"{capped_w:.0f} W rows)")
                else:
                    self.cap_basis = f"analytic (fallback: below the lowest measured cap, {capped_w:.0f} W)"
        self._flops = hw.peak_flops * hw.mfu
        self._bw = hw.hbm_bw * hw.mbu
        self._decode_cache: dict[int, tuple[float, float, float]] = {}

    # -- power -------------------------------------------------------------------------------------------
    def _power_and_slowdown(self, t_compute: float, t_memory: float, t: float) -> tuple[float, float]:
        """Power (W) of a phase whose roofline terms are t_compute, t_memory and whose time is t; and the
        slowdown a power cap forces (frequency ~ sqrt(dynamic power), which makes a 70% cap cost prefill about
        1.3x: the ratio in splitwise_perf_model.csv's h100-80gb-pcap rows)."""
        frac = min(1.0, min(1.0, t_compute / t) + MEMORY_POWER_WEIGHT * min(1.0, t_memory / t))
        idle, peak = self.hw.power_idle_w, self.hw.power_peak_w
        want = idle + (peak - idle) * frac
        if self.cap_w is None or want <= self.cap_w:
            return want, 1.0
        return self.cap_w, math.sqrt((want - idle) / (self.cap_w - idle))

    # -- prefill -----------------------------------------------------------------------------------------
    def prefill(self, tokens: int, sum_sq: float | None = None) -> tuple[float, float]:
        """(seconds, watts) for one prefill pass over `tokens` batched prompt tokens.

        `sum_sq` is the sum of squared prompt lengths (causal attention FLOPs); defaults to one prompt.
        """
        s = self.spec
        if sum_sq is None:
            sum_sq = float(tokens) ** 2
        flops = 2.0 * s.params * tokens + 2.0 * s.layers * s.hidden * sum_sq
        t_c = flops / self._flops
        t_m = (s.weight_bytes + tokens * s.kv_bytes_per_token) / self._bw
        if self.profile is not None:
            t = _interp(tokens, self.profile.prompt_tokens, self.profile.prompt_s)
        else:
            t = self.hw.iter_overhead_s + max(t_c, t_m)
        watts, slow = self._power_and_slowdown(t_c, t_m, t)
        if self._capped is not None:
            tc = _interp(tokens, self._capped.prompt_tokens, self._capped.prompt_s)
            return t + self._cap_mix * (tc - t), watts
        return t * slow, watts

    # -- decode ------------------------------------------------------------------------------------------
    def decode(self, batch: int) -> tuple[float, float, float]:
        """(a, c, watts): one decode iteration over `batch` requests with total context C takes a + c·C seconds."""
        hit = self._decode_cache.get(batch)
        if hit is not None:
            return hit
        s = self.spec
        t_c = 2.0 * s.params * batch / self._flops
        t_w = s.weight_bytes / self._bw
        c = s.kv_bytes_per_token / self._bw
        if self.profile is not None:
            a = _interp(batch, self.profile.batch, self.profile.token_s)
            c = 0.0  # the profiled token time barely moves with context (token_size 128..8192)
        else:
            a = self.hw.iter_overhead_s + max(t_c, t_w)
        # power judged at a typical context (1k tokens per request); the cap then scales the whole iteration
        ctx = 1024.0 * batch
        t_m = t_w + ctx * s.kv_bytes_per_token / self._bw
        watts, slow = self._power_and_slowdown(t_c, t_m, a + c * ctx)
        if self._capped is not None:
            a += self._cap_mix * (_interp(batch, self._capped.batch, self._capped.token_s) - a)
            slow = 1.0
        out = (a * slow, c * slow, watts)
        self._decode_cache[batch] = out
        return out

    def kv_capacity_tokens(self, usable_fraction: float = 0.9) -> int:
        """Tokens of KV cache that fit beside the weights."""
        free = self.hw.memory_bytes * usable_fraction - self.spec.weight_bytes
        return max(0, int(free // self.spec.kv_bytes_per_token))
