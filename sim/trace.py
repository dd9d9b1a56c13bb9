"""Workloads: the Azure LLM inference traces (replayed or time-scaled) and synthetic Poisson/gamma arrivals.

A workload is three aligned arrays (arrival seconds, prompt tokens, output tokens), sorted by arrival.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np

from services.contracts.errors import InvalidArgument

NAMED = {"conv": "AzureLLMInferenceTrace_conv.csv", "code": "AzureLLMInferenceTrace_code.csv"}
COLUMNS = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")


@dataclass(slots=True)
class Workload:
    arrival_s: np.ndarray
    prompt: np.ndarray
    output: np.ndarray
    name: str = "workload"

    def __len__(self) -> int:
        return len(self.arrival_s)


def data_dir() -> Path:
    """TANDEM_DATA_DIR if set, else the copies bundled in sim/data/."""
    env = os.environ.get("TANDEM_DATA_DIR")
    return Path(env) if env else Path(__file__).resolve().parent / "data"


def _parse_time(text: str, where: str) -> float:
    try:
        return float(text)
    except ValueError:
        pass
    try:
        # the Azure traces carry 7 fractional digits; datetime takes at most 6
        head, _, frac = text.strip().partition(".")
        t = datetime.fromisoformat(head).timestamp()
        return t + (float("0." + frac) if frac else 0.0)
    except ValueError:
        raise InvalidArgument(f"{where}: TIMESTAMP {text!r} is neither seconds nor an ISO date-time",
                              param="TIMESTAMP") from None


def load_trace(name_or_path: str) -> Workload:
    """Read `conv`, `code` or a CSV path with columns TIMESTAMP, ContextTokens, GeneratedTokens."""
    path = data_dir() / NAMED[name_or_path] if name_or_path in NAMED else Path(name_or_path)
    if not path.is_file():
        raise InvalidArgument(f"trace: {name_or_path!r} is not 'conv', 'code' or an existing CSV file "
                              f"(looked for {path})", param="trace")
    times: list[float] = []
    prompts: list[int] = []
    outputs: list[int] = []
    with path.open(newline="") as f:
        reader = csv.reader(f)
        header = [h.strip() for h in next(reader, [])]
        missing = [c for c in COLUMNS if c not in header]
        if missing:
            raise InvalidArgument(f"{path}: header lacks column(s) {', '.join(missing)} (need {', '.join(COLUMNS)})",
                                  param="trace")
        it, ic, ig = (header.index(c) for c in COLUMNS)
        for row_no, row in enumerate(reader, start=1):
            if not row:
                continue
            where = f"{path}: row {row_no}"
            if len(row) < len(header):
                raise InvalidArgument(f"{where}: expected {len(header)} fields, got {len(row)}", param="trace")
            times.append(_parse_time(row[it], where))
            for col, idx, lo, out in (("ContextTokens", ic, 0, prompts), ("GeneratedTokens", ig, 1, outputs)):
                try:
                    v = int(row[idx])
                except ValueError:
                    raise InvalidArgument(f"{where}: {col} must be an integer, got {row[idx]!r}", param=col) from None
                if v < lo:
                    raise InvalidArgument(f"{where}: {col} must be ≥ {lo}, got {v}", param=col)
                out.append(v)
    if not times:
        raise InvalidArgument(f"{path}: no requests in the trace", param="trace")
    t = np.asarray(times)
    order = np.argsort(t, kind="stable")
    # a request needs at least one prompt token to run; the Azure traces never have zero, a user file may
    prompt = np.maximum(np.asarray(prompts, dtype=np.int64)[order], 1)
    return Workload(t[order] - t[order][0], prompt, np.asarray(outputs, dtype=np.int64)[order], name=path.stem)


def replay(trace: Workload, *, rate: float | None = None, duration_s: float | None = None) -> Workload:
    """The trace's own timestamps, optionally time-scaled to a mean `rate` and cut at `duration_s`."""
    t = trace.arrival_s.copy()
    if rate is not None:
        span = t[-1] if t[-1] > 0 else 1.0
        t *= (len(t) / span) / rate
    keep = t <= duration_s if duration_s is not None else np.ones(len(t), dtype=bool)
    return Workload(t[keep], trace.prompt[keep], trace.output[keep], name=f"{trace.name}-replay")


def synthetic(trace: Workload | None, *, rate: float, duration_s: float, seed: int = 0, arrival: str = "poisson",
              cv: float = 1.0, fixed: tuple[int, int] | None = None,
              lognormal: tuple[float, float, float] | None = None) -> Workload:
    """Arrivals at `rate`/s for `duration_s` s (Poisson, or gamma with coefficient of variation `cv`);
    sizes sampled with replacement from `trace` (as splitwise-sim builds its traces), `fixed` (prompt, output),
    or `lognormal` (median prompt, median output, sigma)."""
    if rate <= 0:
        raise InvalidArgument(f"rate: must be > 0, got {rate}", param="rate")
    if duration_s <= 0:
        raise InvalidArgument(f"duration: must be > 0, got {duration_s}", param="duration")
    if arrival not in ("poisson", "gamma"):
        raise InvalidArgument(f"arrival: must be 'poisson' or 'gamma', got {arrival!r}", param="arrival")
    if cv <= 0:
        raise InvalidArgument(f"cv: must be > 0, got {cv}", param="cv")
    rng = np.random.default_rng(seed)
    n_guess = int(rate * duration_s * 1.2 + 10 * np.sqrt(rate * duration_s) + 20)
    if arrival == "poisson":
        gaps = rng.exponential(1.0 / rate, n_guess)
    else:
        shape = 1.0 / cv**2
        gaps = rng.gamma(shape, 1.0 / (rate * shape), n_guess)
    t = np.cumsum(gaps)
    while t[-1] < duration_s:  # rare: draw more
        t = np.concatenate([t, t[-1] + np.cumsum(rng.exponential(1.0 / rate, n_guess))])
    t = t[t < duration_s]
    n = len(t)
    if n == 0:
        raise InvalidArgument(f"duration: no request arrives in {duration_s:g} s at {rate:g}/s", param="duration")
    if fixed is not None:
        prompt, output = np.full(n, fixed[0], dtype=np.int64), np.full(n, fixed[1], dtype=np.int64)
        name = f"fixed-{fixed[0]}-{fixed[1]}"
    elif lognormal is not None:
        mp, mo, sigma = lognormal
        prompt = np.maximum(1, np.rint(rng.lognormal(np.log(mp), sigma, n))).astype(np.int64)
        output = np.maximum(1, np.rint(rng.lognormal(np.log(mo), sigma, n))).astype(np.int64)
        name = f"lognormal-{mp:g}-{mo:g}"
    else:
        assert trace is not None
        pick = rng.integers(0, len(trace), n)
        prompt, output, name = trace.prompt[pick], trace.output[pick], trace.name
    return Workload(t, prompt, output, name=f"{name}-{arrival}-{rate:g}rps")


def parse_fixed(spec: str) -> tuple[int, int]:
    """'fixed:PROMPT:OUTPUT' -> (prompt, output)."""
    parts = spec.split(":")
    try:
        p, o = int(parts[1]), int(parts[2])
        if len(parts) != 3 or p < 1 or o < 1:
            raise ValueError
    except (ValueError, IndexError):
        raise InvalidArgument(f"trace: {spec!r} must look like fixed:PROMPT:OUTPUT with both ≥ 1",
                              param="trace") from None
    return p, o


def parse_lognormal(spec: str) -> tuple[float, float, float]:
    """'lognormal:MEDIAN_PROMPT:MEDIAN_OUTPUT[:SIGMA]' -> (prompt, output, sigma); sigma defaults to 1."""
    parts = spec.split(":")
    try:
        if len(parts) not in (3, 4):
            raise ValueError
        p, o = float(parts[1]), float(parts[2])
        sigma = float(parts[3]) if len(parts) == 4 else 1.0
        if p < 1 or o < 1 or sigma <= 0:
            raise ValueError
    except ValueError:
        raise InvalidArgument(f"trace: {spec!r} must look like lognormal:MEDIAN_PROMPT:MEDIAN_OUTPUT[:SIGMA] "
                              "with medians ≥ 1 and sigma > 0", param="trace") from None
    return p, o, sigma


def make_workload(trace: str, *, rate: float | None = None, duration_s: float | None = None, seed: int = 0,
                  arrival: str = "poisson", cv: float = 1.0) -> Workload:
    """The CLI's rule: with --rate and --duration, synthetic arrivals sized from the trace; otherwise a replay."""
    if trace.startswith("fixed:"):
        if rate is None or duration_s is None:
            raise InvalidArgument("trace: fixed:P:O needs --rate and --duration", param="trace")
        return synthetic(None, rate=rate, duration_s=duration_s, seed=seed, arrival=arrival, cv=cv,
                         fixed=parse_fixed(trace))
    if trace.startswith("lognormal:"):
        if rate is None or duration_s is None:
            raise InvalidArgument("trace: lognormal:... needs --rate and --duration", param="trace")
        return synthetic(None, rate=rate, duration_s=duration_s, seed=seed, arrival=arrival, cv=cv,
                         lognormal=parse_lognormal(trace))
    base = load_trace(trace)
    if rate is not None and duration_s is not None:
        return synthetic(base, rate=rate, duration_s=duration_s, seed=seed, arrival=arrival, cv=cv)
    if rate is not None and rate <= 0:
        raise InvalidArgument(f"rate: must be > 0, got {rate}", param="rate")
    if duration_s is not None and duration_s <= 0:
        raise InvalidArgument(f"duration: must be > 0, got {duration_s}", param="duration")
    return replay(base, rate=rate, duration_s=duration_s)
