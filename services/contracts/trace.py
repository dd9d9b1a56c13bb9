"""The Azure LLM inference trace reader (CSV with TIMESTAMP, ContextTokens, GeneratedTokens), shared by the
simulator's workloads (`sim/trace.py`) and the benchmarks' request lengths (`services/bench/fusion_workload.py`).
Pure numpy/stdlib."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np

from services.contracts.errors import InvalidArgument

NAMED = {"conv": "AzureLLMInferenceTrace_conv.csv", "code": "AzureLLMInferenceTrace_code.csv"}
COLUMNS = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")
# splitwise-sim's trace files (its generate_trace.py) carry the same three fields under these names, so one file
# can feed both simulators
SPLITWISE_COLUMNS = ("arrival_timestamp", "prompt_size", "token_size")


@dataclass(slots=True, frozen=True)
class TraceRows:
    """A trace's rows in file order: arrival seconds (absolute), prompt (context) and generated token counts."""

    timestamp_s: np.ndarray
    context_tokens: np.ndarray
    generated_tokens: np.ndarray


def parse_time(text: str, where: str) -> float:
    """Seconds, or an ISO date-time as the Azure traces write it (7 fractional digits)."""
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


def read_csv(path: Path) -> TraceRows:
    """Read and validate a trace CSV (ContextTokens >= 0, GeneratedTokens >= 1); at least one row."""
    times: list[float] = []
    prompts: list[int] = []
    outputs: list[int] = []
    with path.open(newline="") as f:
        reader = csv.reader(f)
        header = [h.strip() for h in next(reader, [])]
        names = COLUMNS
        missing = [c for c in COLUMNS if c not in header]
        if missing and all(c in header for c in SPLITWISE_COLUMNS):
            names, missing = SPLITWISE_COLUMNS, []
        if missing:
            raise InvalidArgument(f"{path}: header lacks column(s) {', '.join(missing)} (need {', '.join(COLUMNS)}, "
                                  f"or splitwise-sim's {', '.join(SPLITWISE_COLUMNS)})", param="trace")
        it, ic, ig = (header.index(c) for c in names)
        width = len(header)
        for row_no, row in enumerate(reader, start=1):
            if not row:
                continue
            if len(row) >= width:  # the common row (seconds, valid counts) without building error context
                try:
                    t, pr, gen = float(row[it]), int(row[ic]), int(row[ig])
                except ValueError:
                    pass
                else:
                    if pr >= 0 and gen >= 1:
                        times.append(t)
                        prompts.append(pr)
                        outputs.append(gen)
                        continue
            # anything else (an ISO time, or a bad row) goes the checked way, which names what is wrong
            where = f"{path}: row {row_no}"
            if len(row) < len(header):
                raise InvalidArgument(f"{where}: expected {len(header)} fields, got {len(row)}", param="trace")
            times.append(parse_time(row[it], where))
            for col, idx, lo, out in ((names[1], ic, 0, prompts), (names[2], ig, 1, outputs)):
                try:
                    v = int(row[idx])
                except ValueError:
                    raise InvalidArgument(f"{where}: {col} must be an integer, got {row[idx]!r}", param=col) from None
                if v < lo:
                    raise InvalidArgument(f"{where}: {col} must be ≥ {lo}, got {v}", param=col)
                out.append(v)
    if not times:
        raise InvalidArgument(f"{path}: no requests in the trace", param="trace")
    return TraceRows(np.asarray(times, dtype=np.float64), np.asarray(prompts, dtype=np.int64),
                     np.asarray(outputs, dtype=np.int64))
