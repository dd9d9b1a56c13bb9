"""Metric definitions shared by the simulator and the real benchmark (TTFT, TBT, E2E, throughput, SLOs).

Both sides reduce their observations to the same arrays and call `summarize_arrays`, so a predicted
and a measured result carry the same keys with the same meaning.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

PERCENTILES = (50, 90, 99)


@dataclass(slots=True)
class RequestRecord:
    """What one request did, on one clock (seconds). `token_times_s` holds every output token's time."""

    request_id: str
    arrival_s: float
    prompt_tokens: int
    token_times_s: list[float] = field(default_factory=list)
    finish_s: float | None = None
    dropped: bool = False

    @property
    def output_tokens(self) -> int:
        return len(self.token_times_s)

    @property
    def ttft_s(self) -> float:
        """Time to first token: arrival to the first output token."""
        return self.token_times_s[0] - self.arrival_s

    @property
    def tbt_gaps_s(self) -> np.ndarray:
        """Time between tokens: every gap between consecutive output tokens."""
        return np.diff(np.asarray(self.token_times_s, dtype=np.float64))

    @property
    def e2e_s(self) -> float:
        """End to end: arrival to the last token (or to finish when set)."""
        end = self.finish_s if self.finish_s is not None else self.token_times_s[-1]
        return end - self.arrival_s


@dataclass(slots=True, frozen=True)
class SLO:
    """Targets a request must meet; None means unconstrained. TBT is the request's mean gap."""

    ttft_s: float | None = None
    tbt_s: float | None = None
    e2e_s: float | None = None


def weighted_percentile(values: np.ndarray, q: float, weights: np.ndarray | None = None) -> float:
    """Percentile `q` (0-100) of `values`, each counted `weights` times (inverted CDF, like numpy's 'inverted_cdf')."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        return float("nan")
    if weights is None:
        return float(np.percentile(values, q, method="inverted_cdf"))
    weights = np.asarray(weights, dtype=np.float64)
    order = np.argsort(values, kind="stable")
    cum = np.cumsum(weights[order])
    target = q / 100.0 * cum[-1]
    idx = int(np.searchsorted(cum, target, side="left"))
    return float(values[order][min(idx, len(order) - 1)])


def slo_mask(ttft: np.ndarray, tbt_mean: np.ndarray, e2e: np.ndarray, slo: SLO) -> np.ndarray:
    ok = np.ones(len(ttft), dtype=bool)
    if slo.ttft_s is not None:
        ok &= ttft <= slo.ttft_s
    if slo.tbt_s is not None:
        ok &= np.nan_to_num(tbt_mean, nan=0.0) <= slo.tbt_s
    if slo.e2e_s is not None:
        ok &= e2e <= slo.e2e_s
    return ok


def summarize_arrays(
    *,
    ttft: np.ndarray,
    e2e: np.ndarray,
    tbt_mean: np.ndarray,
    output_tokens: np.ndarray,
    tbt_gaps: np.ndarray,
    tbt_gap_weights: np.ndarray | None = None,
    duration_s: float,
    dropped: int = 0,
    slo: SLO | None = None,
) -> dict[str, float]:
    """The metric dictionary. Per-request arrays cover completed requests; `dropped` counts the rest.

    SLO attainment is over all requests that entered (a dropped request misses its SLO).
    """
    ttft, e2e, tbt_mean = (np.asarray(a, dtype=np.float64) for a in (ttft, e2e, tbt_mean))
    completed = len(ttft)
    out: dict[str, float] = {}
    for name, arr, w in (
        ("ttft", ttft, None),
        ("tbt", tbt_gaps, tbt_gap_weights),
        ("tbt_mean", tbt_mean[~np.isnan(tbt_mean)] if completed else tbt_mean, None),
        ("e2e", e2e, None),
    ):
        for p in PERCENTILES:
            out[f"{name}_p{p}_s"] = weighted_percentile(arr, p, w)
    total = completed + dropped
    ok = slo_mask(ttft, tbt_mean, e2e, slo or SLO())
    out["slo_attainment"] = float(ok.sum() / total) if total else float("nan")
    out["throughput_rps"] = completed / duration_s if duration_s > 0 else float("nan")
    out["tokens_per_s"] = float(np.sum(output_tokens)) / duration_s if duration_s > 0 else float("nan")
    out["completed"] = completed
    out["dropped"] = dropped
    return out


def summarize(records: Iterable[RequestRecord], *, duration_s: float | None = None, slo: SLO | None = None) -> dict[str, float]:
    """Summarize measured requests. `duration_s` defaults to first arrival -> last finish."""
    done: list[RequestRecord] = []
    dropped = 0
    for r in records:
        if r.dropped or not r.token_times_s:
            dropped += 1
        else:
            done.append(r)
    if duration_s is None:
        if done:
            duration_s = max(r.e2e_s + r.arrival_s for r in done) - min(r.arrival_s for r in done)
        else:
            duration_s = 0.0
    gaps: Sequence[np.ndarray] = [r.tbt_gaps_s for r in done]
    return summarize_arrays(
        ttft=np.array([r.ttft_s for r in done]),
        e2e=np.array([r.e2e_s for r in done]),
        tbt_mean=np.array([g.mean() if g.size else np.nan for g in gaps]),
        output_tokens=np.array([r.output_tokens for r in done]),
        tbt_gaps=np.concatenate(gaps) if gaps else np.array([]),
        duration_s=duration_s,
        dropped=dropped,
        slo=slo,
    )


def request_samples(ttft: np.ndarray, tbt_mean: np.ndarray, e2e: np.ndarray) -> dict[str, list[float]]:
    """Per-request samples for CDFs (the `samples` key of a result JSON, simulated or measured): TTFT, each
    request's mean TBT (requests with one token have none), E2E; microsecond precision."""
    def clean(a: np.ndarray) -> list[float]:
        a = np.asarray(a, dtype=np.float64)
        return [round(float(x), 6) for x in a[np.isfinite(a)]]

    return {"ttft_s": clean(ttft), "tbt_mean_s": clean(tbt_mean), "e2e_s": clean(e2e)}
