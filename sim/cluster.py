"""The simulated cluster: workers built from a layout, the runtime's router (services.contracts.routing: JSQ, mixed
pool) plus Splitwise's mixed-pool fallback, the run loop."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from services.contracts import routing
from services.contracts.errors import InvalidArgument
from services.contracts.layout import Layout
from services.contracts.roles import LLM_ROLES
from sim import catalog
from sim.clock import Clock
from sim.dlm import DLMPool, split
from sim.kvlink import Fabric
from sim.perf import PerfModel, ProfileTable, load_profile
from sim.state import Requests, Tally
from sim.trace import Workload, data_dir
from sim.worker import Host, Worker

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
        by = layout.sim.decode_time_by
        table = load_profile(path, model_key, hw_key, tensor_parallel=max(hw.gpus, 1), decode_time_by=by)
        if power_cap_w is not None and bundled and hw.capped_profile is not None:
            name, capped_w = hw.capped_profile
            capped = load_profile(path, model_key, name, tensor_parallel=max(hw.gpus, 1), decode_time_by=by)
            return PerfModel(hw, spec, profile=table, power_cap_w=power_cap_w, capped=capped, capped_w=capped_w)
    return PerfModel(hw, spec, profile=table, power_cap_w=power_cap_w)


@dataclass(slots=True)
class RunOutput:
    layout: Layout
    workload: Workload
    reqs: Requests
    tally: Tally
    workers: list[Worker]
    end_s: float
    dlm: dict | None = None  # the dlm pool's summary (sim/dlm.py), when the layout has one


class SimulatedCluster:
    """A layout's prefill/decode/mixed workers on one SimPy clock, fed a workload through the router."""

    def __init__(self, layout: Layout, workload: Workload, seed: int = 0) -> None:
        self.layout = layout
        self.env = Clock()
        self.entered = len(workload)
        workload, dlm_arrivals = split(workload, layout.sim.dlm_fraction)  # the dlm share never meets the router
        self.dlm = DLMPool.build(self.env, layout, dlm_arrivals)
        self.reqs = Requests(workload)
        self.workload = workload
        self.tally = Tally()
        self.workers: list[Worker] = []
        self.lanes: dict[int, Worker] = {}  # mixed worker index -> its concurrent prefill lane
        llm = [p for p in layout.pools if p.count > 0 and p.role in ("prefill", "decode", "mixed")]
        link, s = layout.kv_link, layout.sim
        gbps, latency = link.bandwidth_gbps, link.latency_s
        measured = perf_for(layout, llm[0].hardware).profile if llm else None
        if measured is not None and measured.kv_Bps is not None and 0 < measured.kv_Bps < float("inf"):
            gbps, latency = measured.kv_Bps * 8 / 1e9, measured.kv_latency_s or 0.0  # a measured push (tandem profile)
        self.fabric = Fabric(self.env, sum(p.count for p in llm), gbps, latency, link.switch_gbps, s.kv_link_sharing)
        hosts: dict[str, list[Worker]] = {}  # pool.host -> its workers and lanes, when the profile has host rows
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
                self.workers.append(Worker(self.env, len(self.workers), pool.role, perf, batching, self.reqs,
                                           self.tally, self, s.kv_usable_fraction, self.fabric,
                                           kv_transfer=s.kv_transfer, mixed_overhead=s.mixed_overhead, seed=seed))
                if pool.role == "mixed" and perf.concurrent_phases:
                    # the runtime's mixed worker: its prefill batcher runs beside the decode scheduler (own
                    # thread), so prompts never stall the decode batch; the prefill lane shares the router's view
                    dec = self.workers[-1]
                    lane = Worker(self.env, -1 - len(self.lanes), "prefill", perf, batching, self.reqs, self.tally,
                                  self, s.kv_usable_fraction, self.fabric, kv_transfer=s.kv_transfer)
                    lane.load, lane.twin, dec.lane = dec.load, dec, lane
                    self.lanes[dec.idx] = lane
                if perf.shares_host:  # (a mixed worker's prefill lane shares its machine too)
                    w = self.workers[-1]
                    hosts.setdefault(pool.host, []).extend([w] if w.lane is None else [w, w.lane])
        for members in hosts.values():
            if len(members) > 1:  # workers that share a machine slow one another by the profile's host rows
                host = Host()
                host.members = members
                for w in members:
                    w.host = host
        if not self.workers:
            raise InvalidArgument("pools: the simulator needs at least one prefill, decode or mixed worker",
                                  param="pools")
        by_role = {role: [w for w in self.workers if w.role == role] for role in ("prefill", "decode", "mixed")}
        # the runtime's pools: split when both exist, else mixed; a layout with only one split pool (which the
        # runtime would refuse) runs both phases on it. Each pool keeps its routing keys current (routing.Ranked):
        # a worker re-ranks itself when its load changes.
        empty = routing.Ranked((), routing.prefill_key)
        self.prefill_loads = self.decode_loads = self.mixed_loads = empty
        if by_role["prefill"] and by_role["decode"]:
            pools = ((by_role["prefill"], routing.prefill_key, "prefill_loads"),
                     (by_role["decode"], routing.decode_key, "decode_loads"))
        else:
            pools = ((by_role["mixed"] or by_role["prefill"] or by_role["decode"], routing.prefill_key, "mixed_loads"),)
        for members, key, attr in pools:
            ranked = routing.Ranked((w.load for w in members), key)
            setattr(self, attr, ranked)
            for i, w in enumerate(members):
                w.rank, w.rank_i = ranked, i
                if w.lane is not None:  # a concurrent mixed worker's prefill lane moves the same load
                    w.lane.rank, w.lane.rank_i = ranked, i
        self.fallback_tokens = layout.sim.fallback_queue_tokens if layout.router.mixed_fallback else None
        # the gateway's own time per request (tokenize, route, RPC hops), when the profile measured it
        self.gateway_s = max(w.perf.request_overhead_s for w in self.workers)
        self._mixed = lambda: self.mixed_loads
        policy = layout.router.policy  # the pick within one pool (routing.Choose)
        self._choose = routing.jsq if policy == "jsq" else self._in_turn if policy == "round_robin" else self._at_random
        self.rng = np.random.default_rng(0)
        self._rr = 0
        self.done = 0
        self.rejected = 0

    # -- router -------------------------------------------------------------------------------------------------
    def _in_turn(self, loads: routing.Ranked, key: routing.Key) -> routing.Load:
        self._rr += 1
        return loads[self._rr % len(loads)]

    def _at_random(self, loads: routing.Ranked, key: routing.Key) -> routing.Load:
        return loads[int(self.rng.integers(len(loads)))]

    def route(self, rid: int) -> None:
        r = self.reqs
        need = r.prompt[rid] + r.output[rid]  # (Requests holds Python ints while it runs)
        workers = self.workers
        picked = routing.route(self.prefill_loads, self.decode_loads, self._mixed, self._choose)
        assert picked is not None  # the constructor left at least one pool
        pl, dl, mixed = picked
        p, d = pl.address, dl.address  # worker indices
        fb = self.fallback_tokens
        if not mixed and fb is not None:
            pw, dw = workers[p], workers[d]
            if pw.prefill_pending > fb and dw.prefill_pending < pw.prefill_pending:
                p = d  # prefill pool overloaded: this decode worker runs the prompt too (Splitwise's mixed pool)
            elif dw.dec_assigned + need > dw.kv_cap and pw.dec_assigned + need <= pw.kv_cap:
                d = p  # decode pool full: the prefill worker keeps the request (Splitwise's mixed pool)
        if need > workers[d].kv_cap:
            r.rejected[rid] = True
            self.rejected += 1
            return
        r.dest[rid] = d
        r.prefill_on[rid] = p
        workers[d].assign_decode(need)
        self.lanes.get(p, workers[p]).add_prefill(rid)

    def on_done(self, rid: int) -> None:
        r = self.reqs
        self.workers[r.dest[rid]].release_decode(r.prompt[rid] + r.output[rid])
        self.done += 1

    # -- run ----------------------------------------------------------------------------------------------------
    def _arrive(self, rid: int) -> None:
        if self.gateway_s > 0:
            self.env.call(self.gateway_s, self.route, rid)
        else:
            self.route(rid)
        nxt = rid + 1
        if nxt < self.reqs.n:
            self.env.call(self.reqs.arrival[nxt] - self.env.now, self._arrive, nxt)

    def run(self, progress: Callable[[float, float], None] | None = None) -> RunOutput:
        n = self.reqs.n
        last = float(self.reqs.arrival[-1]) if n else 0.0
        if self.dlm is not None:
            last = max(last, self.dlm.last_arrival)
        horizon = last + self.layout.sim.drain_s
        if n:
            self.env.call(float(self.reqs.arrival[0]), self._arrive, 0)
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
        return RunOutput(self.layout, self.workload, self.reqs, self.tally, self.workers, end, dlm)

    def _run_until(self, t: float) -> None:
        if t <= self.env.now:
            return
        self.env.run(until=t)


def simulate(layout: Layout, workload: Workload, progress: Callable[[float, float], None] | None = None,
             seed: int = 0) -> RunOutput:
    """`seed` seeds what the simulator itself draws (the decode step's measured jitter, when the profile has it)."""
    return SimulatedCluster(layout, workload, seed).run(progress)
