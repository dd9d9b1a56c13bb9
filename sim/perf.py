"""Latency and power of one machine running one model: an analytic roofline, or a measured profile table.

Decode iterations are linear in the batch's total context, t = a(b) + c·C, so a batch can be advanced over many
iterations in closed form (see sim/worker.py).
"""

from __future__ import annotations

import bisect
import csv
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
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
    # from `tandem profile` tables (rows with a `kind` column); None/empty for splitwise_perf_model.csv
    token_c: list[float] | None = None  # per batch size: seconds per token of total batch context in a step
    kv_latency_s: float | None = None  # a KV push: latency + bytes / kv_Bps
    kv_Bps: float | None = None
    overheads: dict[str, float] = field(default_factory=dict)  # runtime costs the engine profile cannot see


def _interp(x: float, xs: list[float], ys: list[float]) -> float:
    """Piecewise-linear, extrapolating linearly past both ends (more tokens cost more, never a plateau).
    Pure Python: it runs once per simulated batch, where numpy's call overhead dominates."""
    i = bisect.bisect_right(xs, x) - 1
    if i < 0:  # min(max(i, 0), len(xs) - 2), written out (it runs once per simulated batch)
        i = 0
    elif i > len(xs) - 2:
        i = len(xs) - 2
    y = ys[i] + (ys[i + 1] - ys[i]) * (x - xs[i]) / (xs[i + 1] - xs[i])
    floor = ys[0] * 0.5
    return floor if floor > y else y  # max(y, floor)


def _interp_c(x: float, xs: list[float], ys: list[float]) -> float:
    """Piecewise-linear in batch size, held constant past both ends (a slope per context token)."""
    return float(np.interp(x, xs, ys))


@lru_cache(maxsize=16)
def _read_profile_rows(path: str) -> tuple[dict[str, str], ...]:
    p = Path(path)
    if not p.is_file():
        raise InvalidArgument(f"sim.perf_model: profile table not found: {p}", param="sim.perf_model")
    if p.suffix.lower() == ".json":  # `tandem profile --out x.json`: the same rows plus the fit
        rows = json.loads(p.read_text()).get("rows") or []
        return tuple({k: "" if v is None else str(v) for k, v in r.items()} for r in rows)
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
    where the profile measured 63.8 ms at batch 64).

    A table with a `kind` column (`tandem profile`) has separate prompt, token, kv and overhead rows; its token
    rows also vary the context (token_size per request), from which the context term c(b) is fitted."""
    rows = [r for r in _read_profile_rows(str(path))
            if r["model"] == model_name and r["hardware"] == hw_name
            and int(r.get("tensor_parallel") or tensor_parallel) == tensor_parallel]
    if not rows:
        raise InvalidArgument(f"sim.perf_model: {path} has no rows for model {model_name!r} on {hw_name!r} "
                              f"(tensor_parallel={tensor_parallel})", param="sim.perf_model")
    prompt: dict[int, list[float]] = {}
    token: dict[int, list[float]] = {}
    ctx_rows: list[tuple[int, float, float]] = []
    kv: list[tuple[float, float]] = []
    overheads: dict[str, float] = {}
    for n, r in enumerate(rows, start=2):
        kind = r.get("kind") or ""
        try:
            if kind in ("", "prompt"):
                ps, bs = int(r["prompt_size"]), int(r["batch_size"])
                prompt.setdefault(ps * bs, []).append(float(r["prompt_time"]) / 1e3)
            if kind in ("", "token"):
                bs, tt = int(r["batch_size"]), float(r["token_time"]) / 1e3
                key = int(r["prompt_size"]) * bs if decode_time_by == "batch_tokens" and not kind else bs
                token.setdefault(key, []).append(tt)
                if kind:
                    ctx_rows.append((bs, bs * float(r["token_size"]), tt))
            if kind == "kv":
                kv.append((float(r["kv_bytes"]), float(r["kv_time"]) / 1e3))
            if kind == "overhead":
                overheads[r["name"]] = float(r["value"])
        except (KeyError, ValueError) as exc:
            raise InvalidArgument(f"{path}: row {n}: {exc}", param="sim.perf_model") from None
    if len(prompt) < 2 or len(token) < 2:
        raise InvalidArgument(f"sim.perf_model: {path} needs at least two prompt sizes and two batch sizes for "
                              f"{model_name} on {hw_name}", param="sim.perf_model")
    pk, tk = sorted(prompt), sorted(token)
    reduce = np.median if decode_time_by == "batch_tokens" else np.mean
    table = ProfileTable([float(k) for k in pk], [float(np.mean(prompt[k])) for k in pk],
                         [float(k) for k in tk], [float(reduce(token[k])) for k in tk], overheads=overheads)
    if len({c for _, c, _ in ctx_rows}) > len(tk):  # contexts vary within a batch size: fit a(b) + c·C
        table.token_s, table.token_c = _fit_decode(ctx_rows, tk)
    if len(kv) >= 2:
        slope, icpt = np.polyfit([b for b, _ in kv], [t for _, t in kv], 1)
        table.kv_latency_s, table.kv_Bps = max(float(icpt), 0.0), (1.0 / slope if slope > 0 else float("inf"))
    return table


def _fit_decode(rows: list[tuple[int, float, float]], batches: list[int]) -> tuple[list[float], list[float]]:
    """Per batch size b, least squares of t = a(b) + c(b)·C over its (C, t) rows; c(b) >= 0 (context never
    makes a step cheaper: with a negative slope the intercept is the mean). Exact with two contexts per b."""
    a_out, c_out = [], []
    for b in batches:
        pts = [(c, t) for b2, c, t in rows if b2 == b]
        if len({c for c, _ in pts}) < 2:
            a, c = float(np.mean([t for _, t in pts])), 0.0
        else:
            c, a = (float(v) for v in np.polyfit([c for c, _ in pts], [t for _, t in pts], 1))
            if c < 0:
                a, c = float(np.mean([t for _, t in pts])), 0.0
        a_out.append(max(a, 1e-6))
        c_out.append(c)
    return a_out, c_out


def _keyed(overheads: dict[str, float], prefix: str) -> tuple[list[float], list[float]] | None:
    """Overhead rows `<prefix><integer>` as sorted (keys, values), or None when there are none."""
    pts = sorted((int(k[len(prefix):]), v) for k, v in overheads.items()
                 if k.startswith(prefix) and k[len(prefix):].isdigit())
    return ([float(k) for k, _ in pts], [float(v) for _, v in pts]) if pts else None


def _at(table: tuple[list[float], list[float]], k: int) -> float:
    """The value at integer key k: exact where measured, linear between, the nearest end's past the ends."""
    return _interp_c(k, *table)


def _by_batches(table: tuple[list[float], list[float]] | None, batches: tuple[list[float], list[float]] | None,
                ) -> dict[int, tuple[list[float], list[float]]] | None:
    """A phase-keyed table (streams -> value) split by each phase's decode batches (streams -> batches), or None
    when either is missing. Phases without a batch count are left out."""
    if table is None or batches is None:
        return None
    nb = {int(s): round(b) for s, b in zip(*batches, strict=True)}
    out: dict[int, tuple[list[float], list[float]]] = {}
    for s, v in zip(*table, strict=True):
        if int(s) in nb:
            xs, ys = out.setdefault(nb[int(s)], ([], []))
            xs.append(s)
            ys.append(v)
    return out or None


def _closest(counts: Iterable[int], want: int) -> int:
    """The measured count nearest to `want` (the larger on a tie)."""
    return min(counts, key=lambda k: (abs(k - want), -k))


def _nearest(groups: dict[int, tuple[list[float], list[float]]], batches: int) -> tuple[list[float], list[float]]:
    """The group measured with the batch count nearest to `batches` (the larger on a tie)."""
    return groups[_closest(groups, batches)]


def _inverse_cdf(pts: list[tuple[float, float]], rows: str) -> tuple[np.ndarray, np.ndarray]:
    """(levels, values) of quantile rows, checked: levels 0 to 1, values non-decreasing and non-negative."""
    pts = sorted(pts)
    levels, values = np.array([lv for lv, _ in pts]), np.array([v for _, v in pts])
    if len(pts) < 2 or levels[0] != 0.0 or levels[-1] != 1.0 or np.any(np.diff(levels) <= 0) \
            or np.any(np.diff(values) < 0) or values[0] < 0:
        raise InvalidArgument(f"profile: {rows} rows must run from q0000 to q1000 with non-decreasing, "
                              "non-negative values", param="sim.perf_model")
    return levels, values


def step_jitter(overheads: dict[str, float]) -> tuple[np.ndarray, np.ndarray] | None:
    """(levels, multipliers): the inverse CDF of the decode step's in-cluster multiplier, from the profile's
    step_jitter_q<per mille> rows (`tandem profile`), or None when it has none."""
    pts = [(int(k[len("step_jitter_q"):]) / 1000.0, float(v)) for k, v in overheads.items()
           if k.startswith("step_jitter_q")]
    return _inverse_cdf(pts, "step_jitter_q") if pts else None


def host_covered(overheads: dict[str, float]) -> dict[int, tuple[np.ndarray, np.ndarray]] | None:
    """streams -> (levels, multipliers): per host-probe phase (that many requests decoding), the inverse CDF of a
    decode gap that a prefill covered over the phase's median quiet gap (rows host_covered_q<per mille>@<s>), or
    None when the profile has none."""
    by: dict[int, list[tuple[float, float]]] = {}
    for k, v in overheads.items():
        if k.startswith("host_covered_q"):
            level, _, streams = k[len("host_covered_q"):].partition("@")
            if not (level.isdigit() and streams.isdigit()):
                raise InvalidArgument(f"profile: {k!r} is not host_covered_q<per mille>@<streams>",
                                      param="sim.perf_model")
            by.setdefault(int(streams), []).append((int(level) / 1000.0, float(v)))
    return {s: _inverse_cdf(pts, f"host_covered_q*@{s}") for s, pts in by.items()} or None


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
        self._prefill_cache: dict[tuple[int, float | None], tuple[float, float]] = {}
        ovh = profile.overheads if profile is not None else {}
        # runtime costs measured by `tandem profile` through a running cluster (0 / 1 without them)
        self.request_overhead_s = ovh.get("request_overhead_s", 0.0)  # gateway: tokenize, route, RPC hops
        self.decode_join_s = ovh.get("decode_join_s", 0.0)  # Decode call + KV claim before a request joins
        # ... and what a request joining a running batch adds to that step for the members already in it (the
        # joiner's own first gap is decode_join_s + a step, as measured on lone requests)
        self.decode_join_stall_s = ovh.get("decode_join_stall_s", 0.0)
        self.decode_ratio = ovh.get("decode_step_ratio", 1.0)  # in-cluster step / engine-alone step
        # ... and by batch size (`decode_step_ratio@B`, b requests decoding at once through the gateway)
        self._ratio_b = _keyed(ovh, "decode_step_ratio@")
        self.prefill_ratio = ovh.get("prefill_ratio", 1.0)
        # ... and by prompt size (`prefill_ratio@N`: N-token prompts alone through the cluster), over the batch's
        # prompt tokens, held constant past the ends
        self._prefill_ratio_n = _keyed(ovh, "prefill_ratio@")
        # what the workers of one host do to one another (`tandem profile`'s host probe through the local
        # cluster): a prefill's slowdown while s requests decode there; a decode step's while n decode batches
        # (itself included) run there, and what a prefill beside them adds with s requests decoding. None: no such
        # rows (workers never slow one another unless the mixed worker's own side-by-side rows say so)
        self._host_prefill = _keyed(ovh, "host_prefill_slowdown@")
        self._host_decode = _keyed(ovh, "host_decode_slowdown@")
        self._host_decode_p = _keyed(ovh, "host_decode_slowdown_prefill@")
        self.shares_host = any(x is not None for x in (self._host_prefill, self._host_decode, self._host_decode_p))
        # ... and how many decode batches each probe phase's streams ran on (`host_phase_batches@s`): then the two
        # beside-a-prefill slowdowns are read among the phases with as many batches as run on the host (the
        # nearest measured count), over their streams, since a host's cores are shared by its busy processes and
        # a batch of s requests is one of them; without the rows, over all phases by streams alone
        batches = _keyed(ovh, "host_phase_batches@")
        self._host_prefill_nb = _by_batches(self._host_prefill, batches)
        self._host_decode_p_nb = _by_batches(self._host_decode_p, batches)
        # with those rows, a running prefill also follows the host's decode batches as they start and stop
        # (sim/worker.py), instead of keeping the slowdown of the moment it started for its whole length
        self.host_retime_prefill = self._host_prefill_nb is not None
        # ... and the spread of a decode gap beside a prefill (host_covered_q<per mille>@s): with it (and the
        # step's own spread, `jitter`), such a step draws its factor from the phase's measured distribution
        # instead of taking host_decode_slowdown_prefill's median (sim/worker.py); None: the median
        self._host_covered = host_covered(ovh)
        self.has_host_covered = self._host_covered is not None
        self._phase_batches = {int(s): round(v) for s, v in zip(*batches, strict=True)} if batches else {}
        self.first_token_after_kv = bool(ovh.get("first_token_after_kv", 0.0))  # our runtime's Prefill reply
        self.concurrent_phases = bool(ovh.get("concurrent_phases", 0.0))  # mixed: prefill and decode threads
        # our engine runs a prefill batch padded to its longest prompt (the table's rows are uniform batches, n x b
        # tokens), so a batch costs what b prompts of the longest length cost; without the row, the sum of them
        self.prefill_padded = bool(ovh.get("prefill_padded", 0.0))
        # ... which share the process's cores: each phase's slowdown while the other runs (measured side by side)
        self.mixed_prefill_slowdown = ovh.get("mixed_prefill_slowdown", 1.0)
        self.mixed_decode_slowdown = ovh.get("mixed_decode_slowdown", 1.0)
        # the in-cluster step's spread (overhead rows step_jitter_q<per mille>): each decode iteration's duration
        # is multiplied by a draw from this empirical distribution (sim/worker.py); None: every step as profiled
        self.jitter = step_jitter(ovh)

    # -- one host's workers slowing one another -------------------------------------------------------------
    def host_prefill_slowdown(self, streams: int, batches: int = 0) -> float:
        """A prefill's slowdown while `streams` requests in `batches` decode batches decode on its host (linear
        between the measured stream counts, the nearest end's past them; 1 with none decoding or without host
        rows). `batches` picks the phases when the profile says each phase's batches (host_phase_batches@s)."""
        if streams <= 0 or self._host_prefill is None:
            return 1.0
        if self._host_prefill_nb is not None and batches > 0:
            return _at(_nearest(self._host_prefill_nb, batches), streams)
        return _at(self._host_prefill, streams)

    def host_decode_slowdown(self, batches: int, streams: int, prefill: bool) -> float:
        """A decode step's slowdown while `batches` decode batches (its own included) holding `streams` requests
        run on its host, and, if `prefill`, a prompt prefills there (1 alone or without host rows)."""
        f = _at(self._host_decode, batches) if batches > 1 and self._host_decode is not None else 1.0
        if prefill and self._host_decode_p is not None:
            table = self._host_decode_p if self._host_decode_p_nb is None else _nearest(self._host_decode_p_nb, batches)
            f *= _at(table, streams)
        return f

    def host_covered(self, batches: int, streams: int) -> tuple[np.ndarray, np.ndarray] | None:
        """The covered-gap distribution of the probe phase nearest a host's state: among the phases with the
        decode-batch count nearest `batches` (when the profile says each phase's), the one with the stream count
        nearest `streams` (the larger on a tie); None without such rows."""
        if self._host_covered is None:
            return None
        phases = list(self._host_covered)
        counted = [s for s in phases if s in self._phase_batches]
        if counted:
            near = _closest({self._phase_batches[s] for s in counted}, batches)
            phases = [s for s in counted if self._phase_batches[s] == near]
        return self._host_covered[_closest(phases, streams)]

    # -- power -------------------------------------------------------------------------------------------
    def _power_and_slowdown(self, t_compute: float, t_memory: float, t: float) -> tuple[float, float]:
        """Power (W) of a phase whose roofline terms are t_compute, t_memory and whose time is t; and the
        slowdown a power cap forces (frequency ~ sqrt(dynamic power), which makes a 70% cap cost prefill about
        1.3x: the ratio in splitwise_perf_model.csv's h100-80gb-pcap rows)."""
        # min(1.0, min(1.0, t_compute / t) + MEMORY_POWER_WEIGHT * min(1.0, t_memory / t)), without the calls
        fc, fm = t_compute / t, t_memory / t  # (min(1.0, x) is x if x < 1.0 else 1.0)
        frac = (fc if fc < 1.0 else 1.0) + MEMORY_POWER_WEIGHT * (fm if fm < 1.0 else 1.0)
        if not frac < 1.0:
            frac = 1.0
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
        hit = self._prefill_cache.get((tokens, sum_sq))  # a pure function of its arguments: remembered
        if hit is None:
            hit = self._prefill_cache[(tokens, sum_sq)] = self._prefill(tokens, sum_sq)
        return hit

    def _prefill(self, tokens: int, sum_sq: float | None) -> tuple[float, float]:
        s = self.spec
        if sum_sq is None:
            sum_sq = float(tokens) ** 2
        flops = 2.0 * s.params * tokens + 2.0 * s.layers * s.hidden * sum_sq
        t_c = flops / self._flops
        t_m = (s.weight_bytes + tokens * s.kv_bytes_per_token) / self._bw
        if self.profile is not None:
            ratio = self.prefill_ratio if self._prefill_ratio_n is None else _interp_c(tokens, *self._prefill_ratio_n)
            t = _interp(tokens, self.profile.prompt_tokens, self.profile.prompt_s) * ratio
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
            ratio = self.decode_ratio if self._ratio_b is None else _interp_c(batch, *self._ratio_b)
            a = _interp(batch, self.profile.batch, self.profile.token_s) * ratio
            # splitwise_perf_model.csv: the token time barely moves with context (token_size 128..8192)
            c = 0.0 if not self.profile.token_c else _interp_c(batch, self.profile.batch, self.profile.token_c)
            c *= ratio
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
