"""Per-request state as flat numpy arrays, plus the cluster-wide tallies workers write into."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from sim.trace import Workload


class Requests:
    """Struct of per-request columns indexed by request id (= position in the workload).

    Plain Python lists while the simulation runs (scalar access is several times cheaper than numpy's);
    `freeze()` turns them into numpy arrays for the summary.
    """

    __slots__ = ("arrival", "prompt", "output", "first_tok", "first_gap", "finish", "gen", "rejected", "dest",
                 "prefill_on", "n")

    def __init__(self, w: Workload) -> None:
        n = self.n = len(w)
        nan = float("nan")
        self.arrival = w.arrival_s.astype(np.float64).tolist()
        self.prompt = w.prompt.astype(np.int64).tolist()
        self.output = w.output.astype(np.int64).tolist()
        self.first_tok = [nan] * n
        self.first_gap = [nan] * n  # first token -> second token (includes the KV transfer)
        self.finish = [nan] * n
        self.gen = [0] * n  # tokens produced (conservation check)
        self.rejected = [False] * n
        self.dest = [-1] * n  # decode worker
        self.prefill_on = [-1] * n

    def freeze(self) -> None:
        for name, dtype in (("arrival", np.float64), ("prompt", np.int64), ("output", np.int64),
                            ("first_tok", np.float64), ("first_gap", np.float64), ("finish", np.float64),
                            ("gen", np.int64), ("rejected", bool), ("dest", np.int64), ("prefill_on", np.int64)):
            setattr(self, name, np.asarray(getattr(self, name), dtype=dtype))


@dataclass(slots=True)
class Tally:
    """TBT gap samples (value, weight) and power steps (time, +/- watts above idle)."""

    gap_values: list[float] = field(default_factory=list)
    gap_weights: list[float] = field(default_factory=list)
    power_t: list[float] = field(default_factory=list)
    power_dw: list[float] = field(default_factory=list)
    busy_energy_j: float = 0.0
    events: int = 0

    def busy(self, t0: float, t1: float, watts_above_idle: float) -> None:
        self.busy_energy_j += (t1 - t0) * watts_above_idle
        self.power_t += (t0, t1)
        self.power_dw += (watts_above_idle, -watts_above_idle)

    def peak_above_idle(self) -> float:
        if not self.power_t:
            return 0.0
        t = np.asarray(self.power_t)
        dw = np.asarray(self.power_dw)
        order = np.lexsort((dw, t))  # at equal times apply drops first, so back-to-back intervals don't stack
        return float(max(0.0, np.cumsum(dw[order]).max()))
