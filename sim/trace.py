"""Workloads: the Azure LLM inference traces (replayed or time-scaled) and synthetic Poisson/gamma arrivals.

A workload is three aligned arrays (arrival seconds, prompt tokens, output tokens), sorted by arrival.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from services.contracts.errors import InvalidArgument
from services.contracts.trace import NAMED, read_csv


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


def load_trace(name_or_path: str) -> Workload:
    """Read `conv`, `code` or a CSV path with columns TIMESTAMP, ContextTokens, GeneratedTokens."""
    path = data_dir() / NAMED[name_or_path] if name_or_path in NAMED else Path(name_or_path)
    if not path.is_file():
        raise InvalidArgument(f"trace: {name_or_path!r} is not 'conv', 'code' or an existing CSV file "
                              f"(looked for {path})", param="trace")
    rows = read_csv(path)
    t = rows.timestamp_s
    order = np.argsort(t, kind="stable")
    # a request needs at least one prompt token to run; the Azure traces never have zero, a user file may
    prompt = np.maximum(rows.context_tokens[order], 1)
    return Workload(t[order] - t[order][0], prompt, rows.generated_tokens[order], name=path.stem)


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
