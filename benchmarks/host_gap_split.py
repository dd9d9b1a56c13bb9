"""Which decode gaps a prefill stretches on a shared host (fidelity diagnosis, issue 13): one long stream on each
decode worker of a split layout, then prompts one at a time with a quiet spell after each; every token gap of the
streams is sorted by what ran beside it: the prefill (and KV push) of a prompt whose KV this stream's decode worker
receives ("receiving"), of a prompt going to the other decode worker ("other"), or nothing ("quiet").

    python benchmarks/host_gap_split.py [--layout examples/local-split.yaml] [--prompts 14] [--json gaps.json]
"""

from __future__ import annotations

import argparse
import json
import time

import grpc
import numpy as np

from services.bench.cluster import running_cluster
from services.bench.load import prompt_ids, stream_one
from services.bench.profile import _overlap, _stream_live


def measure(layout: str, prompts: int, sizes: tuple[int, ...] = (128, 256), output: int = 700) -> dict:
    with running_cluster(layout) as (lay, _):
        gw = lay.gateway.grpc
        for i in range(3):
            stream_one(gw, prompt_ids(64, 900 + i), 4, f"warm-{i}")
        ch = grpc.insecure_channel(gw)
        try:
            live = []
            for j in range(2):  # JSQ puts the second on the other decode worker
                live.append(_stream_live(ch, prompt_ids(32, 950 + j), output, f"stream-{j}"))
                while len(live[-1][1]["times"]) < 3:
                    time.sleep(0.005)
            events = []  # (prefill start, first token, the prompt's decode worker)
            for i in range(prompts):
                t0 = time.perf_counter()
                r = stream_one(gw, prompt_ids(sizes[i % len(sizes)], 1000 + i), 2, f"prompt-{i}")
                events.append((t0 + r["ttft_s"] - r["kv_transfer_s"] - r["prefill_s"], t0 + r["ttft_s"],
                               r["workers"][-1]))
                time.sleep(max(0.3, r["prefill_s"]))
            for th, _ in live:
                th.join(600)
        finally:
            ch.close()
    gaps: dict[str, list[float]] = {"receiving": [], "other": [], "quiet": []}
    for _, rec in live:
        worker, times = rec["workers"][-1], rec["times"]
        mine = [(a, b) for a, b, w in events if w == worker]
        theirs = [(a, b) for a, b, w in events if w != worker]
        for a, b in zip(times[2:], times[3:], strict=False):
            if b <= a:
                continue  # several tokens in one message
            key = "receiving" if _overlap(a, b, mine) > 0 else "other" if _overlap(a, b, theirs) > 0 else "quiet"
            gaps[key].append(b - a)
    return {"gaps": gaps, "prompt_workers": [w for _, _, w in events],
            "stream_workers": [rec["workers"][-1] for _, rec in live]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layout", default="examples/local-split.yaml")
    ap.add_argument("--prompts", type=int, default=14)
    ap.add_argument("--json")
    a = ap.parse_args()
    res = measure(a.layout, a.prompts)
    quiet = float(np.median(res["gaps"]["quiet"])) if res["gaps"]["quiet"] else float("nan")
    for key, v in res["gaps"].items():
        if v:
            q = np.percentile(v, [50, 90, 99, 100])
            print(f"{key:9s} {len(v):5d} gaps  median {q[0]:.4f}  p90 {q[1]:.4f}  p99 {q[2]:.4f}  max {q[3]:.4f} s"
                  f"  (x quiet median: {q[0] / quiet:.2f} / {q[1] / quiet:.2f} / {q[2] / quiet:.2f})")
    print(f"prompts went to {sorted(set(res['prompt_workers']))}; streams on {res['stream_workers']}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f)


if __name__ == "__main__":
    main()
