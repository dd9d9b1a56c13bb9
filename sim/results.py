"""Reduce a simulated run to the shared metric dictionary plus cost, power and Splitwise-style SLO slowdowns."""

from __future__ import annotations

import numpy as np

from services.contracts.layout import Layout
from services.contracts.metrics import summarize_arrays, weighted_percentile
from sim.cluster import RunOutput, perf_for

# Splitwise's SLOs as slowdown over the request running alone on a DGX-A100, at p50 / p90 / p99
# (our reading of the paper's SLO table; see docs/sim.md).
SLOWDOWN_SLO = {"ttft": (2.0, 3.0, 6.0), "tbt": (1.25, 1.5, 5.0), "e2e": (1.25, 1.5, 5.0)}


def reference_latency(layout: Layout, prompt: np.ndarray, output: np.ndarray) -> tuple[np.ndarray, ...]:
    """Uncontended TTFT, mean TBT and E2E of each request on the layout's slowdown reference hardware."""
    perf = perf_for(layout, layout.sim.slowdown_ref, field="sim.slowdown_ref")
    a, c, _ = perf.decode(1)
    uniq, inv = np.unique(prompt, return_inverse=True)
    ttft = np.array([perf.prefill(int(p))[0] for p in uniq])[inv]
    tbt = a + c * (prompt + output / 2.0)
    e2e = ttft + np.maximum(output - 1, 0) * tbt
    return ttft, tbt, e2e


def summarize_run(run: RunOutput) -> dict[str, float]:
    r, layout, tally = run.reqs, run.layout, run.tally
    done = ~np.isnan(r.finish)
    completed = int(done.sum())
    entered = r.n
    dropped = entered - completed
    ttft = r.first_tok[done] - r.arrival[done]
    e2e = r.finish[done] - r.arrival[done]
    out_tok = r.output[done]
    multi = out_tok > 1
    tbt_mean = np.full(completed, np.nan)
    tbt_mean[multi] = (r.finish[done][multi] - r.first_tok[done][multi]) / (out_tok[multi] - 1)
    gaps = np.concatenate([r.first_gap[done][multi], np.asarray(tally.gap_values)])
    weights = np.concatenate([np.ones(int(multi.sum())), np.asarray(tally.gap_weights)])
    duration = max(run.end_s, 1e-9)
    res = summarize_arrays(ttft=ttft, e2e=e2e, tbt_mean=tbt_mean, output_tokens=out_tok, tbt_gaps=gaps,
                           tbt_gap_weights=weights, duration_s=duration, dropped=dropped, slo=layout.slo.to_slo())
    # means; tbt_mean_s is the mean over requests of each request's mean gap (what splitwise-sim reports)
    for k, vals in (("ttft", ttft), ("tbt", tbt_mean), ("e2e", e2e)):
        v = vals[~np.isnan(vals)]
        res[f"{k}_mean_s"] = float(v.mean()) if v.size else float("nan")
    # cost and power
    workers = run.workers
    cost_h = float(sum(m.perf.hw.cost_per_hour for m in workers))
    idle_w = float(sum(m.idle_w for m in workers))
    energy = idle_w * duration + tally.busy_energy_j
    tokens = int(out_tok.sum())
    res.update(
        entered=entered,
        rejected=int(r.rejected.sum()),
        unfinished=int(dropped - r.rejected.sum()),
        offered_rps=float(entered / max(float(r.arrival[-1]), 1e-9)) if entered else 0.0,
        # completions during the arrival window only (throughput_rps divides by the run incl. the drain)
        throughput_window_rps=float((r.finish <= r.arrival[-1]).sum() / max(float(r.arrival[-1]), 1e-9))
        if entered else 0.0,
        duration_s=duration,
        tokens_generated=int(r.gen.sum()),
        output_tokens_completed=tokens,
        machines=len(workers),
        cost_per_hour=cost_h,
        cost_per_million_tokens=cost_h * duration / 3600.0 / tokens * 1e6 if tokens else float("nan"),
        power_mean_w=energy / duration,
        power_peak_w=idle_w + tally.peak_above_idle(),
        power_provisioned_w=float(sum(m.perf.cap_w or m.perf.hw.power_peak_w for m in workers)),
        energy_j=energy,
        energy_per_token_j=energy / tokens if tokens else float("nan"),
        sim_events=tally.events,
    )
    res.update(slowdown_check(layout, run, done, ttft, tbt_mean, e2e, res))
    if run.dlm is not None:  # the dlm pool's own share; the numbers above are the LLM requests only
        res["dlm"] = run.dlm
        res["cluster_cost_per_hour"] = cost_h + run.dlm["cost_per_hour"]
    return res


def slowdown_check(layout: Layout, run: RunOutput, done: np.ndarray, ttft: np.ndarray, tbt_mean: np.ndarray,
                   e2e: np.ndarray, res: dict) -> dict[str, float]:
    """Slowdown percentiles over every request that entered (dropped ones count as infinitely slow); the
    every-gap TBT slowdown divides the gap percentiles by the median reference gap."""
    r = run.reqs
    ref_ttft, ref_tbt, ref_e2e = reference_latency(layout, r.prompt, r.output)
    out: dict[str, float] = {}
    ok = True
    # "request": each request's mean gap (as splitwise-sim reports TBT); "gap": every inter-token gap, so a
    # prompt interrupting a colocated decode batch shows in the tail
    gap_basis = layout.sim.tbt_slo_basis == "gap"
    for name, vals in (("ttft", ttft), ("tbt", tbt_mean), ("e2e", e2e)):
        ref = {"ttft": ref_ttft, "tbt": ref_tbt, "e2e": ref_e2e}[name]
        sd = np.full(r.n, np.inf)
        sd[done] = np.nan_to_num(vals / ref[done], nan=1.0)  # one-token requests have no TBT: not slowed
        for q, limit in zip((50, 90, 99), SLOWDOWN_SLO[name], strict=True):
            v = weighted_percentile(sd, q)
            out[f"slowdown_{name}_p{q}"] = v
            if name == "tbt":
                g = res[f"tbt_p{q}_s"] / float(np.median(ref_tbt)) if r.n else float("nan")
                out[f"slowdown_tbt_gap_p{q}"] = g
                if gap_basis:
                    v = g if res["dropped"] / max(r.n, 1) <= 1 - q / 100 else float("inf")
            ok &= v <= limit
    out["slowdown_slo_met"] = bool(ok) and r.n > 0
    return out
