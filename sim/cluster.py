"""The simulated cluster: machines built from a layout, Splitwise's router (JSQ, mixed-pool fallback), the run loop."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import simpy

from services.contracts.errors import InvalidArgument
from services.contracts.layout import Layout
from services.contracts.roles import LLM_ROLES
from sim import catalog
from sim.dlm import DLMPool, split
from sim.machine import Machine
from sim.perf import PerfModel, ProfileTable, load_profile
from sim.state import Requests, Tally
from sim.trace import Workload, data_dir

BUNDLED_PROFILE = Path(__file__).resolve().parent / "data" / "splitwise_perf_model.csv"


def profile_path(layout: Layout) -> Path | None:
    src = layout.sim.perf_model
    if src == "roofline":
        return None
    if src == "profile":
        p = data_dir() / "splitwise_perf_model.csv"
        return p if p.is_file() else BUNDLED_PROFILE
    return Path(src)


def perf_for(layout: Layout, hw_name: str, power_cap_w: float | None = None, field: str = "hardware") -> PerfModel:
    """The perf model of the layout's model on `hw_name` (profile table when asked for and available)."""
    hw = catalog.hardware(hw_name, field)
    spec = catalog.model(layout.model.name)
    path = profile_path(layout)
    table: ProfileTable | None = None
    if path is not None:
        # the bundled table names hardware/models its own way; any other table uses our catalog names
        bundled = path.resolve() == BUNDLED_PROFILE.resolve() or path.name == BUNDLED_PROFILE.name
        hw_key = hw.profile_name if bundled else hw.name
        model_key = spec.profile_name if bundled else spec.name
        if hw_key is None or model_key is None:
            raise InvalidArgument(f"sim.perf_model: the profile table has no {spec.name} on {hw.name}; "
                                  "use perf_model: roofline", param="sim.perf_model")
        table = load_profile(path, model_key, hw_key, tensor_parallel=max(hw.gpus, 1))
    return PerfModel(hw, spec, profile=table, power_cap_w=power_cap_w)


@dataclass(slots=True)
class RunOutput:
    layout: Layout
    workload: Workload
    reqs: Requests
    tally: Tally
    machines: list[Machine]
    end_s: float
    dlm: dict | None = None  # the dlm pool's summary (sim/dlm.py), when the layout has one


class Cluster:
    def __init__(self, layout: Layout, workload: Workload) -> None:
        self.layout = layout
        self.env = simpy.Environment()
        self.entered = len(workload)
        workload, dlm_arrivals = split(workload, layout.sim.dlm_fraction)  # the dlm share never meets the router
        self.dlm = DLMPool.build(self.env, layout, dlm_arrivals)
        self.reqs = Requests(workload)
        self.workload = workload
        self.tally = Tally()
        self.machines: list[Machine] = []
        roles: list[str] = []
        for pi, pool in enumerate(layout.pools):
            if pool.count == 0:
                continue
            if pool.role not in LLM_ROLES:
                continue  # diffusion workers (dlm, policy) serve no LLM requests: not simulated
            perf = perf_for(layout, pool.hardware, pool.power_cap_w, field=f"pools.{pi}.hardware")
            if perf.kv_capacity_tokens(layout.sim.kv_usable_fraction) <= 0 and pool.role != "prefill":
                raise InvalidArgument(f"pools.{pi}.hardware: {pool.hardware} cannot hold {layout.model.name}'s "
                                      "weights and any KV cache", param=f"pools.{pi}.hardware")
            batching = pool.batching or layout.batching
            for _ in range(pool.count):
                m = Machine(self.env, len(self.machines), pool.role, perf, batching, self.reqs, self.tally, self,
                            layout.sim.kv_usable_fraction, layout.kv_link.bandwidth_gbps, layout.kv_link.latency_s)
                self.machines.append(m)
                roles.append(pool.role)
        if not self.machines:
            raise InvalidArgument("pools: the simulator needs at least one prefill, decode or mixed machine",
                                  param="pools")
        roles_a = np.array(roles)
        self.prompt_idx = np.flatnonzero((roles_a == "prefill") | (roles_a == "mixed"))
        self.decode_idx = np.flatnonzero((roles_a == "decode") | (roles_a == "mixed"))
        if len(self.prompt_idx) == 0:
            self.prompt_idx = self.decode_idx
        if len(self.decode_idx) == 0:
            self.decode_idx = self.prompt_idx
        self.colocated = bool(np.array_equal(self.prompt_idx, self.decode_idx))
        n = len(self.machines)
        self.pref_load = np.zeros(n)  # estimated seconds of queued prefill work
        self.dec_load = np.zeros(n)  # share of KV capacity assigned
        self.kv_cap = np.array([m.kv_cap for m in self.machines], dtype=np.float64)
        self.fallback_tokens = layout.sim.fallback_queue_tokens if layout.router.mixed_fallback else None
        self.rng = np.random.default_rng(0)
        self._rr = 0
        self.done = 0
        self.rejected = 0

    # -- router -------------------------------------------------------------------------------------------------
    def _pick(self, idx: np.ndarray, load: np.ndarray) -> int:
        policy = self.layout.router.policy
        if policy == "jsq":
            return int(idx[int(np.argmin(load[idx]))])
        if policy == "round_robin":
            self._rr += 1
            return int(idx[self._rr % len(idx)])
        return int(idx[int(self.rng.integers(len(idx)))])

    def route(self, rid: int) -> None:
        r = self.reqs
        need = int(r.prompt[rid] + r.output[rid])
        machines = self.machines
        if self.colocated:
            load = self.pref_load + self.dec_load
            p = d = self._pick(self.prompt_idx, load)
        else:
            p = self._pick(self.prompt_idx, self.pref_load)
            d = self._pick(self.decode_idx, self.dec_load)
            fb = self.fallback_tokens
            if fb is not None:
                pm, dm = machines[p], machines[d]
                if pm.prompt_pending > fb and dm.prompt_pending < pm.prompt_pending:
                    p = d  # prompt pool overloaded: this token machine runs the prompt too (mixed pool)
                elif dm.dec_assigned + need > dm.kv_cap and pm.dec_assigned + need <= pm.kv_cap:
                    d = p  # token pool full: the prompt machine keeps the request (mixed pool)
        if need > machines[d].kv_cap:
            r.rejected[rid] = True
            self.rejected += 1
            return
        r.dest[rid] = d
        r.prefill_on[rid] = p
        dm = machines[d]
        dm.dec_assigned += need
        self.dec_load[d] = dm.dec_assigned / self.kv_cap[d]
        machines[p].add_prompt(rid)

    def on_done(self, rid: int) -> None:
        r = self.reqs
        d = int(r.dest[rid])
        m = self.machines[d]
        m.dec_assigned -= int(r.prompt[rid] + r.output[rid])
        self.dec_load[d] = m.dec_assigned / self.kv_cap[d]
        self.done += 1

    # -- run ----------------------------------------------------------------------------------------------------
    def _arrive(self, rid: int, _ev: object) -> None:
        self.route(rid)
        nxt = rid + 1
        if nxt < self.reqs.n:
            ev = self.env.timeout(self.reqs.arrival[nxt] - self.env.now)
            ev.callbacks.append(partial(self._arrive, nxt))

    def run(self, progress: Callable[[float, float], None] | None = None) -> RunOutput:
        n = self.reqs.n
        last = float(self.reqs.arrival[-1]) if n else 0.0
        if self.dlm is not None:
            last = max(last, self.dlm.last_arrival)
        horizon = last + self.layout.sim.drain_s
        if n:
            ev = self.env.timeout(float(self.reqs.arrival[0]))
            ev.callbacks.append(partial(self._arrive, 0))
        if progress is None:
            self._run_until(horizon)
        else:
            steps = 50
            for i in range(1, steps + 1):
                self._run_until(last * i / steps)
                progress(min(self.env.now, last), last)
            self._run_until(horizon)
        self.reqs.freeze()
        end = self.env.now
        fin = self.reqs.finish[~np.isnan(self.reqs.finish)]
        if fin.size:
            end = max(float(fin.max()), last)
        dlm = self.dlm.summary() if self.dlm is not None else None
        return RunOutput(self.layout, self.workload, self.reqs, self.tally, self.machines, end, dlm)

    def _run_until(self, t: float) -> None:
        if t <= self.env.now:
            return
        try:
            self.env.run(until=t)
        except ValueError:
            pass


def simulate(layout: Layout, workload: Workload, progress: Callable[[float, float], None] | None = None) -> RunOutput:
    return Cluster(layout, workload).run(progress)
