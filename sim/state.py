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
                 "prefill_on", "n", "_inputs")

    def __init__(self, w: Workload) -> None:
        n = self.n = len(w)
        nan = float("nan")
        # the inputs as arrays too: freeze() hands these back rather than converting the unchanged lists
        self._inputs = (w.arrival_s.astype(np.float64), w.prompt.astype(np.int64), w.output.astype(np.int64))
        self.arrival, self.prompt, self.output = (a.tolist() for a in self._inputs)
        self.first_tok = [nan] * n
        self.first_gap = [nan] * n  # first token -> second token (includes the KV transfer)
        self.finish = [nan] * n
        self.gen = [0] * n  # tokens produced (conservation check)
        self.rejected = [False] * n
        self.dest = [-1] * n  # decode worker
        self.prefill_on = [-1] * n

    def freeze(self) -> None:
        self.arrival, self.prompt, self.output = self._inputs  # read-only while the simulation ran
        for name, dtype in (("first_tok", np.float64), ("first_gap", np.float64), ("finish", np.float64),
                            ("gen", np.int64), ("rejected", bool), ("dest", np.int64), ("prefill_on", np.int64)):
            setattr(self, name, np.asarray(getattr(self, name), dtype=dtype))


@dataclass(slots=True)
class Tally:
    """What the workers record as they go, one append per event: TBT gap samples `gaps` (value, weight) and busy
    spans `spans` (start, end, watts above idle), one per unit of work (prefill batch or decode segment) finished.
    Totals are derived when asked for, in recording order (so the float sums are the ones a running total gives)."""

    gaps: list[tuple[float, int]] = field(default_factory=list)
    spans: list[tuple[float, float, float]] = field(default_factory=list)

    def busy(self, t0: float, t1: float, watts_above_idle: float) -> None:
        self.spans.append((t0, t1, watts_above_idle))

    @property
    def events(self) -> int:
        """Units of work simulated (each ends in one event)."""
        return len(self.spans)

    @property
    def gap_values(self) -> list[float]:
        return [v for v, _ in self.gaps]

    @property
    def gap_weights(self) -> list[float]:
        return [float(w) for _, w in self.gaps]

    @property
    def busy_energy_j(self) -> float:
        energy = 0.0
        for t0, t1, w in self.spans:
            energy += (t1 - t0) * w
        return energy

    def peak_above_idle(self) -> float:
        if not self.spans:
            return 0.0
        spans = np.asarray(self.spans, dtype=np.float64)
        t = spans[:, :2].ravel()  # t0, t1, t0', t1', ...
        dw = np.column_stack((spans[:, 2], -spans[:, 2])).ravel()  # +w at the start, -w at the end
        order = np.lexsort((dw, t))  # at equal times apply drops first, so back-to-back intervals don't stack
        return float(max(0.0, np.cumsum(dw[order]).max()))
