"""Measure seconds per dlm request for each sampler variant on this machine, as the simulator's dlm cost table.

    tandem dlm profile --json sim/data/dlm_profile.json [--n 30] [--hardware cpu]

Runs the served engine (DLMEngine, one torch thread as `tandem serve dlm` does) on held-out prompts; the file
keeps other hardware's entries, so profiles from several machines can share it. The simulator only reads it.
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np

from services.dlm.protocol import VARIANTS


def measure(n: int = 30, threads: int = 1, warmup: int = 3, seed: int = 12345) -> dict:
    """{variant: stats} over `n` held-out prompts (all three tasks), after `warmup` unmeasured requests."""
    import torch

    from services.dlm.server import DLMEngine

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _measure(DLMEngine(), n, threads, warmup, seed)
    finally:
        torch.set_num_threads(before)


def _measure(eng: Any, n: int, threads: int, warmup: int, seed: int) -> dict:
    import torch
    from rich.progress import Progress

    from services.bench.dlm_evaluate import variant_options
    from services.dlm.tasks import eval_set

    prompts = [ex.prompt for ex in eval_set(n, seed)]
    out: dict[str, dict] = {}
    with Progress(transient=True) as bar:
        task = bar.add_task("profiling dlm variants", total=len(VARIANTS) * (n + warmup))
        for name in VARIANTS:
            opts, guided = variant_options(name, eng.defaults)
            kw = {"cache": opts.cache, "guided": guided}
            for p in prompts[:warmup]:
                list(eng.stream(p, **kw))
                bar.advance(task)
            secs, fwd = [], []
            for p in prompts:
                t0 = time.perf_counter()
                chunks = list(eng.stream(p, **kw))
                secs.append(time.perf_counter() - t0)
                fwd.append(chunks[-1].forward_passes)
                bar.advance(task)
            s = np.asarray(secs)
            out[name] = {"cache": opts.cache, "guided": guided, "requests": n,
                         "mean_s": float(s.mean()), "p50_s": float(np.percentile(s, 50)),
                         "p90_s": float(np.percentile(s, 90)), "p99_s": float(np.percentile(s, 99)),
                         "forward_passes_mean": float(np.mean(fwd)),
                         "samples_s": [round(float(x), 6) for x in secs]}
    return {"model": "tandem-dlm-char", "checkpoint_sha256": eng.sha256, "gen_len": eng.defaults.gen_len,
            "block": eng.defaults.block, "torch_threads": threads, "torch": torch.__version__, "variants": out}


def write(path: Path, hardware: str, entry: dict, command: str) -> dict:
    """Merge this machine's entry into the profile file (other hardware's entries are kept)."""
    doc = json.loads(path.read_text()) if path.is_file() else {}
    doc.setdefault("about", "seconds per dlm request (one request at a time, end to end in the worker's engine) "
                   "by hardware and sampler variant; read by sim/dlm.py")
    doc.setdefault("hardware", {})[hardware] = {**entry, "command": command, "machine": platform.processor()
                                                or platform.machine(), "python": platform.python_version()}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1) + "\n")
    return doc
