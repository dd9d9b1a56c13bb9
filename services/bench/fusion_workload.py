"""Benchmark workloads: prompt/generation lengths from the Azure LLM inference trace, Poisson arrival times."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from services.contracts.trace import NAMED, read_csv

TRACE_NAME = NAMED["conv"]
# 64 (ContextTokens, GeneratedTokens) rows drawn (seed 0) from the trace above, so the benchmark runs anywhere.
EMBEDDED_SAMPLE = (
    (1176, 116), (181, 156), (981, 400), (380, 81), (206, 162), (1013, 399), (96, 118), (375, 67), (227, 73),
    (1030, 550), (397, 121), (1328, 60), (1838, 129), (1314, 206), (1041, 589), (1009, 429), (1038, 394),
    (374, 99), (181, 100), (1318, 196), (383, 57), (1075, 412), (50, 168), (865, 47), (91, 16), (1157, 410),
    (405, 108), (968, 419), (1156, 643), (382, 84), (409, 143), (2393, 73), (2168, 74), (338, 83), (1312, 207),
    (379, 44), (902, 29), (1134, 429), (4082, 104), (1078, 615), (1024, 474), (209, 181), (1024, 429), (398, 104),
    (438, 81), (1085, 440), (383, 80), (1025, 421), (1187, 992), (4084, 57), (961, 399), (1145, 907), (1061, 409),
    (407, 88), (387, 52), (1093, 396), (405, 159), (2655, 108), (1049, 413), (392, 86), (4101, 68), (1159, 429),
    (4086, 46), (1775, 52),
)


REPO = Path(__file__).resolve().parents[2]


def trace_candidates() -> list[Path]:
    return [REPO / "sim" / "data" / TRACE_NAME, REPO.parent / "shared" / "data" / TRACE_NAME]


def load_lengths() -> tuple[np.ndarray, np.ndarray, str]:
    """(context tokens, generated tokens, where they came from): the trace if found, else the embedded sample."""
    for path in trace_candidates():
        if path.is_file():
            rows = read_csv(path)  # file order
            return rows.context_tokens, rows.generated_tokens, os.path.relpath(path, REPO)  # no machine paths
    ctx, gen = zip(*EMBEDDED_SAMPLE, strict=True)
    return np.array(ctx), np.array(gen), "embedded sample of " + TRACE_NAME


@dataclass(slots=True, frozen=True)
class Shape:
    """How trace lengths are shrunk for a small machine: divide by `scale`, then clip."""

    scale: float = 8.0
    max_prompt: int = 128
    max_new: int = 64

    def prompt(self, ctx: int) -> int:
        return int(np.clip(round(ctx / self.scale), 1, self.max_prompt))

    def new_tokens(self, gen: int) -> int:
        # max_tokens counts prefill's first token; >= 2 so every request decodes at least one token
        return int(np.clip(round(gen / self.scale), 2, self.max_new))


@dataclass(slots=True, frozen=True)
class Job:
    prompt_len: int
    max_tokens: int
    unit_gap: float  # exponential(1) inter-arrival gap; divided by the rate to get seconds


def draw_jobs(n: int, shape: Shape, seed: int = 0) -> tuple[list[Job], str]:
    """n requests with (prompt, generation) lengths resampled jointly from the trace, and Poisson gaps."""
    ctx, gen, source = load_lengths()
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(gen), n)
    gaps = rng.exponential(1.0, n)
    jobs = [Job(shape.prompt(int(ctx[i])), shape.new_tokens(int(gen[i])), float(g)) for i, g in zip(idx, gaps, strict=True)]
    return jobs, source


def arrival_times(jobs: list[Job], rate_rps: float) -> list[float]:
    """Poisson process at `rate_rps`: cumulative exponential gaps; the first request arrives at t=0."""
    t, out = 0.0, []
    for j in jobs:
        out.append(t)
        t += j.unit_gap / rate_rps
    return out
