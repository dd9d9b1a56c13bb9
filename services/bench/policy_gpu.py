"""One device call: train, calibrate schedules, and run the full table with CUDA graphs.

`PYTHONPATH=. python -m services.bench.policy_gpu --out-dir $OUT` (torch/numpy only); results land in
$OUT/ckpt (checkpoint + schedules) and $OUT/gpu_table.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from services.bench import policy as bench
from services.policy import checkpoint
from services.policy.model import DenoiserConfig
from services.train import policy as train


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out-dir", dest="out", type=Path, help="folder for the checkpoint and gpu_table.json (required)")
    p.add_argument("--out", dest="out", type=Path, help=argparse.SUPPRESS)  # the old spelling of --out-dir
    p.add_argument("--train-seconds", type=float, default=150)
    p.add_argument("--episodes", type=int, default=3000)
    p.add_argument("--eval-episodes", type=int, default=500)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--n-layer", type=int, default=6)
    p.add_argument("--n-emb", type=int, default=128)
    p.add_argument("--checkpoint", type=Path, default=None, help="skip training and use this checkpoint")
    p.add_argument("--only", nargs="*", default=None, help="run just these config names")
    args = p.parse_args()
    if args.out is None:
        p.error("--out-dir is required")
    args.out.mkdir(parents=True, exist_ok=True)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.backends.cuda.matmul.allow_tf32 = False  # keep fp32 numerics comparable with the CPU table
    ckpt = args.out / "ckpt"
    if args.checkpoint is None:
        cfg = DenoiserConfig(n_layer=args.n_layer, n_emb=args.n_emb)
        model, norm, info = train.train(cfg, args.episodes, args.train_seconds, 10**7, args.batch, 3e-4, dev)
        checkpoint.save(model, norm, ckpt, info)
    else:
        ckpt = args.checkpoint
    model, norm, meta = checkpoint.load(ckpt, dev)
    t0 = time.time()
    schedules = bench.compute_schedules(model, norm)
    (args.out / "schedules.json").write_text(json.dumps(schedules))
    print(f"schedules in {time.time() - t0:.1f}s", flush=True)
    checks = bench.exact_checks(model, norm, schedules)
    print(checks, flush=True)
    configs = [c for c in bench.full_configs() if args.only is None or c.name in args.only]
    known = {c.name for c in configs}
    for name in args.only or []:  # a row outside the standard table: "sampler/method/S=N" with a computed budget
        if name not in known:
            parts = name.split("/")
            if len(parts) != 3 or parts[0] not in bench.SAMPLERS or not parts[2].removeprefix("S=").isdigit():
                p.error(f"--only: {name!r} is neither a table row nor sampler/method/S=N")
            configs.append(bench.PolicyBenchConfig(parts[0], int(parts[2].removeprefix("S=")), parts[1]))
    rows = bench.run_table(model, norm, schedules, configs, args.eval_episodes, args.reps,
                           graphs=dev == "cuda", progress=lambda s: print(s, flush=True))
    device = torch.cuda.get_device_name() if dev == "cuda" else "cpu"
    (args.out / "gpu_table.json").write_text(json.dumps({"device": device, "train": meta.get("train"),
                                                         "exact_checks": checks, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
