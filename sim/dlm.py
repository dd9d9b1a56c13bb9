"""The dlm pool in the simulator: `sim.dlm_fraction` of requests go to diffusion-LM workers, each serving one
request at a time (FIFO, least-queued worker first) for a time drawn from the measured profile table.

The table (sim/data/dlm_profile.json) is written by `tandem dlm profile`; this module only reads it.
Power: idle watts always, peak watts while serving; cost: the catalog's $/hour per worker.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import simpy

from services.contracts.errors import InvalidArgument
from services.contracts.layout import Layout
from services.contracts.metrics import weighted_percentile
from sim import catalog
from sim.trace import Workload

BUNDLED = Path(__file__).resolve().parent / "data"
SPLIT_SEED = 20240601  # which requests go to the dlm pool: fixed, so a layout + trace always splits the same way


def profile_file(layout: Layout) -> Path:
    p = Path(layout.sim.dlm_profile)
    return p if p.is_file() or p.is_absolute() or len(p.parts) > 1 else BUNDLED / p


def load_samples(layout: Layout, hardware: str, field_name: str) -> np.ndarray:
    """Measured seconds per request for `hardware` and the layout's `sim.dlm_variant`."""
    path = profile_file(layout)
    if not path.is_file():
        raise InvalidArgument(f"sim.dlm_profile: {path} not found; make it with `tandem dlm profile "
                              f"--json {path}`", param="sim.dlm_profile")
    try:
        doc = json.loads(path.read_text())
    except ValueError as exc:
        raise InvalidArgument(f"sim.dlm_profile: {path} is not valid JSON ({exc})", param="sim.dlm_profile") from None
    hw = doc.get("hardware", {}).get(hardware)
    if hw is None:
        raise InvalidArgument(f"{field_name}: {path} has no dlm profile for hardware {hardware!r} (profiled: "
                              f"{', '.join(doc.get('hardware', {})) or 'none'})", param=field_name)
    variant = hw.get("variants", {}).get(layout.sim.dlm_variant)
    if variant is None:
        raise InvalidArgument(f"sim.dlm_variant: {layout.sim.dlm_variant!r} is not in {path} (have: "
                              f"{', '.join(hw.get('variants', {}))})", param="sim.dlm_variant")
    samples = np.asarray(variant.get("samples_s") or [variant["mean_s"]], dtype=np.float64)
    if samples.size == 0 or not np.all(np.isfinite(samples)) or np.any(samples <= 0):
        raise InvalidArgument(f"sim.dlm_profile: {path} has non-positive or missing times for {hardware}",
                              param="sim.dlm_profile")
    return samples


def split(workload: Workload, fraction: float) -> tuple[Workload, np.ndarray]:
    """(the LLM requests, the dlm requests' arrival times): each request goes to the dlm pool with `fraction`."""
    if fraction <= 0:
        return workload, np.zeros(0)
    mask = np.random.default_rng(SPLIT_SEED).random(len(workload)) < fraction
    keep = ~mask
    llm = Workload(workload.arrival_s[keep], workload.prompt[keep], workload.output[keep], workload.name)
    return llm, np.asarray(workload.arrival_s[mask], dtype=np.float64)


@dataclass(slots=True)
class DLMWorker:
    hw: catalog.Hardware
    samples: np.ndarray
    slot: simpy.Resource
    queued: int = 0
    busy_s: float = 0.0


@dataclass(slots=True)
class DLMPool:
    """The layout's dlm workers and the requests sent to them (arrival, start, service time, finish per request)."""

    env: simpy.Environment
    arrivals: np.ndarray
    workers: list[DLMWorker] = field(default_factory=list)
    start: np.ndarray = field(default_factory=lambda: np.zeros(0))
    service: np.ndarray = field(default_factory=lambda: np.zeros(0))
    finish: np.ndarray = field(default_factory=lambda: np.zeros(0))
    variant: str = ""
    rng: np.random.Generator = field(default_factory=lambda: np.random.default_rng(0))

    @classmethod
    def build(cls, env: simpy.Environment, layout: Layout, arrivals: np.ndarray) -> DLMPool | None:
        pools = [(i, p) for i, p in enumerate(layout.pools) if p.role == "dlm" and p.count > 0]
        if not pools:
            if layout.sim.dlm_fraction > 0:
                raise InvalidArgument(f"sim.dlm_fraction: {layout.sim.dlm_fraction} of requests go to the dlm pool, "
                                      "but the layout has no dlm pool with count > 0", param="sim.dlm_fraction")
            return None
        pool = cls(env, arrivals, variant=layout.sim.dlm_variant)
        for i, p in pools:
            hw = catalog.hardware(p.hardware, f"pools.{i}.hardware")
            samples = load_samples(layout, p.hardware, f"pools.{i}.hardware")
            pool.workers += [DLMWorker(hw, samples, simpy.Resource(env, capacity=1)) for _ in range(p.count)]
        n = len(arrivals)
        pool.start, pool.service, pool.finish = np.full(n, np.nan), np.full(n, np.nan), np.full(n, np.nan)
        env.process(pool._arrive())
        return pool

    @property
    def last_arrival(self) -> float:
        return float(self.arrivals[-1]) if len(self.arrivals) else 0.0

    def _arrive(self):  # noqa: ANN202 - a SimPy process
        for rid, t in enumerate(self.arrivals):
            if t > self.env.now:
                yield self.env.timeout(float(t) - self.env.now)
            m = min(self.workers, key=lambda x: x.queued)  # join the shortest queue (ties: layout order)
            m.queued += 1
            self.env.process(self._serve(rid, m))

    def _serve(self, rid: int, m: DLMWorker):  # noqa: ANN202 - a SimPy process
        with m.slot.request() as turn:
            yield turn
            self.start[rid] = self.env.now
            s = float(m.samples[self.rng.integers(m.samples.size)])
            self.service[rid] = s
            yield self.env.timeout(s)
            m.busy_s += s
        m.queued -= 1
        self.finish[rid] = self.env.now

    def summary(self) -> dict[str, float]:
        """dlm requests' latency percentiles (arrival -> answer); throughput, utilization, cost and energy over
        the pool's own window (time 0 to its last arrival or answer, whichever is later)."""
        n = len(self.arrivals)
        done = ~np.isnan(self.finish)
        wait = self.start[done] - self.arrivals[done]
        lat = wait + self.service[done]  # = finish - arrival, without the clock's rounding (idle: the sample itself)
        fin = self.finish[done]
        duration = max(self.last_arrival, float(fin.max()) if fin.size else 0.0, 1e-9)
        cost_h = float(sum(m.hw.cost_per_hour for m in self.workers))
        idle_w = float(sum(m.hw.power_idle_w for m in self.workers))
        energy = idle_w * duration + sum((m.hw.power_peak_w - m.hw.power_idle_w) * m.busy_s for m in self.workers)
        completed = int(done.sum())

        return {"variant": self.variant, "machines": len(self.workers), "requests": n, "completed": completed,
                "unfinished": n - completed,
                **{f"latency_p{q}_s": weighted_percentile(lat, q) for q in (50, 90, 99)},
                "latency_mean_s": float(lat.mean()) if lat.size else float("nan"),
                "queue_p99_s": weighted_percentile(wait, 99),
                "duration_s": duration, "throughput_rps": completed / duration,
                "utilization": float(sum(m.busy_s for m in self.workers)) / (duration * len(self.workers)),
                "cost_per_hour": cost_h,
                "cost_per_million_requests": cost_h * duration / 3600.0 / completed * 1e6 if completed else float("nan"),
                "energy_j": energy, "power_mean_w": energy / duration,
                "energy_per_request_j": energy / completed if completed else float("nan")}
