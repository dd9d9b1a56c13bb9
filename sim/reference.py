"""Side by side with splitwise-sim (the Splitwise paper's simulator, a separate checkout run in its own Python):
one trace file, per-request timelines from both, and our model with splitwise-sim's choices switched on one at a
time. Used by `benchmarks/sim_reference.py` and `tandem bench sim --reference`. Runs the reference as a
subprocess; nothing of it is imported or copied."""

from __future__ import annotations

import csv
import gc
import resource
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from services.contracts.layout import Layout, load_layout
from sim.cluster import simulate
from sim.trace import data_dir, load_trace

REPO = Path(__file__).resolve().parents[1]

# design -> (our layout, splitwise-sim's hydra overrides, its scheduler, its start-state directory)
DESIGNS: dict[str, tuple[str, list[str], str, str]] = {
    "baseline-h100": ("examples/sim/baseline-h100.yaml",
                      ["applications.0.scheduler=token_jsq", "start_state=baseline"], "token_jsq", "baseline"),
    "splitwise-hh": ("examples/sim/splitwise-hh.yaml",
                     ["applications.0.scheduler=mixed_pool", "start_state=splitwise",
                      "start_state.split_type=homogeneous", "start_state.prompt.num_instances=25",
                      "start_state.token.num_instances=15"], "mixed_pool", "splitwise_25_15"),
}

# splitwise-sim's choices where ours differ (docs/sim.md, "Against splitwise-sim"), as our layout settings; the
# hypotheses are tried one at a time on top of our defaults, then all together
SPLITWISE_CHOICES: dict[str, dict[str, object]] = {
    "decode time keyed by prompt x batch tokens": {"sim.decode_time_by": "batch_tokens"},
    "all memory usable for weights + KV": {"sim.kv_usable_fraction": 1.0},
    "mixed iteration 1.1x": {"sim.mixed_overhead": 0.1},
    "KV whole after the prefill, 200 GiB/s, no sharing": {"sim.kv_transfer": "after_prefill",
                                                          "sim.kv_link_sharing": "none",
                                                          "kv_link.bandwidth_gbps": 200 * 2**30 * 8 / 1e9},
    "decode batch up to 512": {"batching.max_batch": 512},
}
SPLITWISE_ALL = {k: v for choice in SPLITWISE_CHOICES.values() for k, v in choice.items()}

# the reference hardwires a Ray launcher (and a head address) into configs/config.yaml; a copy without it
LOCAL_CONFIG = "tandem_local"

_TRACE_SCRIPT = """
import sys, types
sys.modules.setdefault("requests", types.ModuleType("requests"))  # generate_trace imports it to download
import numpy as np
import generate_trace as g
np.random.seed({seed})
df = g.generate_trace_from_prompt_token_size_distributions(1000000, {duration}, {rate}, {dist!r})
df.to_csv({out!r}, index=False)
"""


@dataclass(slots=True)
class Timelines:
    """Per-request TTFT and E2E (s) in request-id order, output tokens, and the CPU seconds the run took."""

    ttft: np.ndarray
    e2e: np.ndarray
    output: np.ndarray
    cpu_s: float

    @property
    def tbt(self) -> np.ndarray:
        """splitwise-sim's per-request TBT: (E2E - TTFT) / output tokens (ours divides by output - 1 gaps)."""
        return (self.e2e - self.ttft) / self.output

    def stats(self) -> dict[str, float]:
        out = {}
        for name in ("ttft", "tbt", "e2e"):
            v = getattr(self, name)
            out[f"{name}_p50_s"], out[f"{name}_p99_s"] = (float(np.percentile(v, q)) for q in (50, 99))
        out["cpu_us_per_request"] = self.cpu_s / len(self.e2e) * 1e6
        return out


def make_trace(ref: Path, python: str, *, rate: float, duration_s: float, seed: int) -> Path:
    """One trace file, drawn by the reference's own generator (Poisson arrivals, sizes sampled from the
    conversation trace) from our copy of the Azure CSV; written where the reference looks for traces."""
    name = f"rr_conv_{rate:g}_{duration_s:g}s_seed{seed}"
    out = ref / "traces" / f"{name}.csv"
    out.parent.mkdir(exist_ok=True)
    dist = data_dir() / "AzureLLMInferenceTrace_conv.csv"
    script = _TRACE_SCRIPT.format(seed=seed, duration=duration_s, rate=rate, dist=str(dist), out=str(out))
    subprocess.run([python, "-c", script], cwd=ref, check=True)
    return out


def _local_config(ref: Path) -> None:
    text = (ref / "configs" / "config.yaml").read_text()
    text = text.replace("  - override hydra/launcher: ray\n", "")
    if "  launcher:" in text:
        text = text[:text.index("  launcher:")]
    (ref / "configs" / f"{LOCAL_CONFIG}.yaml").write_text(text)


def run_reference(ref: Path, python: str, design: str, trace: Path, seed: int = 0) -> Timelines:
    _local_config(ref)
    _, overrides, sched, state = DESIGNS[design]
    cmd = [python, "run.py", "--config-name", LOCAL_CONFIG, "cluster=half_half", "cluster.servers.0.count=0",
           "cluster.servers.1.count=40", "performance_model=db", f"trace.filename={trace.stem}", f"seed={seed}",
           *overrides]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run(cmd, cwd=ref, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    path = ref / "results" / str(seed) / state / trace.stem / "0_40" / "bloom-176b" / sched / "detailed" / "0.csv"
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    rid = np.array([int(float(r["request_ids"])) for r in rows])
    order = np.argsort(rid)

    def col(k: str) -> np.ndarray:
        return np.array([float(r[k]) for r in rows])[order]

    return Timelines(col("ttft_times"), col("response_times"), col("token_sizes"), cpu)


def with_settings(layout: Layout, settings: dict[str, object]) -> Layout:
    """The layout with dotted settings applied, e.g. {"sim.decode_time_by": "batch_tokens"}."""
    data = layout.model_dump()
    for key, value in settings.items():
        node = data
        *head, last = key.split(".")
        for part in head:
            node = node[part]
        node[last] = value
    return Layout.model_validate(data)


def run_ours(layout: Layout, trace: Path) -> Timelines:
    # a clean heap first: the reference runs in a fresh process, and the garbage earlier runs in this one left (a
    # simulation's objects form cycles) would otherwise be collected on this run's clock
    gc.collect()
    t0 = time.process_time()
    r = simulate(layout, load_trace(str(trace))).reqs
    cpu = time.process_time() - t0
    if np.isnan(r.finish).any():
        raise RuntimeError(f"{layout.name}: {int(np.isnan(r.finish).sum())} requests did not finish")
    return Timelines(r.first_tok - r.arrival, r.finish - r.arrival, r.output.astype(float), cpu)


def compare(ref: Path, python: str, designs: list[str], *, rate: float = 70.0, duration_s: float = 120.0,
            seed: int = 0, hypotheses: bool = True) -> dict:
    """Every number of the comparison: per design, the reference's and each of our variants' statistics."""
    trace = make_trace(ref, python, rate=rate, duration_s=duration_s, seed=seed)
    out: dict = {"trace": str(trace), "rate": rate, "duration_s": duration_s, "seed": seed, "designs": {}}
    for design in designs:
        theirs = run_reference(ref, python, design, trace, seed)
        base = load_layout(REPO / DESIGNS[design][0])
        variants = {"ours (defaults)": {}}
        if hypotheses:
            variants.update({f"+ {name}": s for name, s in SPLITWISE_CHOICES.items()})
        variants["ours with all of splitwise-sim's choices"] = SPLITWISE_ALL
        rows = {"splitwise-sim": theirs.stats()}
        for label, settings in variants.items():
            ours = run_ours(with_settings(base, settings), trace)
            assert np.array_equal(ours.output, theirs.output), "the two runs saw different requests"
            st = ours.stats()
            st["per_request_e2e_ratio_median"] = float(np.median(ours.e2e / theirs.e2e))
            st["settings"] = settings
            rows[label] = st
        out["designs"][design] = rows
    return out


def table(result: dict) -> str:
    head = ("| design | simulator | TTFT p50 | p99 | TBT p50 | p99 | E2E p50 | p99 | CPU µs / request |\n"
            "|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for design, rows in result["designs"].items():
        ref = rows["splitwise-sim"]
        for label, st in rows.items():
            cells = []
            for k in ("ttft_p50_s", "ttft_p99_s", "tbt_p50_s", "tbt_p99_s", "e2e_p50_s", "e2e_p99_s"):
                d = "" if label == "splitwise-sim" else f" ({100 * (st[k] / ref[k] - 1):+.1f}%)"
                cells.append(f"{st[k]:.4g}{d}")
            lines.append(f"| {design} | {label} | " + " | ".join(cells) + f" | {st['cpu_us_per_request']:,.0f} |")
    return "\n".join(lines)
