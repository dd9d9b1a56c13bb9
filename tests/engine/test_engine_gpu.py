"""The CUDA-graphed decode step against the eager step on the same GPU (skipped without CUDA)."""

from __future__ import annotations

import pytest
import torch
from kit.checkpoints import random_state, tiny_config

from services.engine.engine import Engine
from services.engine.model import Transformer

pytestmark = pytest.mark.gpu


def _engine(dtype: torch.dtype, graphs: bool) -> Engine:
    cfg = tiny_config(n_layers=3, dim=128, n_heads=4, n_kv_heads=2, hidden_dim=256, max_seq_len=512)
    model = Transformer(cfg)
    model.load_state_dict(random_state(cfg, seed=3), strict=False)
    return Engine(model, device="cuda", dtype=dtype, graphs=graphs)


def _greedy(engine: Engine, prompts: list[list[int]], steps: int) -> list[list[int]]:
    """Greedy continuation of every prompt, all decoded as one dense batch."""
    kv = engine.new_kv(len(prompts), 512)
    last = engine.prefill(prompts, kv, list(range(len(prompts)))).argmax(-1).tolist()
    out = [[t] for t in last]
    for _ in range(steps):
        last = engine.decode(last, kv, slice(0, len(prompts))).argmax(-1).tolist()
        for o, t in zip(out, last, strict=True):
            o.append(t)
    return out


@pytest.mark.parametrize("batch", [1, 3, 5])
def test_graphed_greedy_tokens_equal_eager_fp32(batch: int) -> None:
    g = torch.Generator().manual_seed(batch)
    # different lengths, some past one 64-key block, so per-slot lengths and key splits both matter
    prompts = [torch.randint(3, 384, (int(n),), generator=g).tolist()
               for n in torch.randint(5, 150, (batch,), generator=g)]
    eager = _greedy(_engine(torch.float32, graphs=False), prompts, 40)
    fast_engine = _engine(torch.float32, graphs=True)
    fast = _greedy(fast_engine, prompts, 40)
    assert fast == eager
    assert fast_engine.graphs.replays == 40 and fast_engine.graphs.captures == 1
    assert set(fast_engine.graphs.graphs) == {{1: 1, 3: 4, 5: 8}[batch]}  # the bucket, padding rows included


@pytest.mark.parametrize("rows", [1, 3])
def test_graphed_logits_close_to_eager_bf16_and_kv_identical_layout(rows: int) -> None:
    prompts = [list(range(10, 90)), [5, 6, 7, 8], [9] * 33][:rows]
    fast, eager = _engine(torch.bfloat16, True), _engine(torch.bfloat16, False)
    kvs = []
    for e in (fast, eager):
        kv = e.new_kv(rows, 256)
        e.prefill(prompts, kv, list(range(rows)))
        logits = [e.decode([11, 12, 13][:rows], kv, slice(0, rows)) for _ in range(4)]
        kvs.append((kv, torch.stack(logits)))
    (kf, lf), (ke, le) = kvs
    assert fast.graphs.replays == 4
    assert kf.lengths == ke.lengths == [84, 8, 37][:rows]
    rel = (lf - le).norm() / le.norm()
    assert rel < 2e-2, rel
    n = max(kf.lengths)
    assert ((kf.k[:, :, :n] - ke.k[:, :, :n]).norm() / ke.k[:, :, :n].norm()) < 2e-2


def test_scheduler_replays_graphs_and_matches_solo_eager_tokens() -> None:
    from services.batching.scheduler import DecodeRequest, FusionScheduler
    from services.bench.fusion_reference import prefill, solo_decode
    from services.engine.sampling import SamplingParams

    engine, eager = _engine(torch.float32, True), _engine(torch.float32, False)
    sched = FusionScheduler(engine, "fusion", max_batch=8)
    got: dict[str, list[int]] = {}
    want: dict[str, list[int]] = {}
    for i in range(6):
        rid, ids = f"r{i}", list(range(3 + i, 20 + 9 * i))
        params = SamplingParams(max_tokens=8 + 5 * i, temperature=0)
        kv, first = prefill(engine, ids, params)
        want[rid] = solo_decode(eager, kv, first, params)
        got[rid] = []
        sched.submit(DecodeRequest(rid, kv, first, params,
                                   lambda tok, reason, rid=rid: got[rid].append(tok) if tok >= 0 else None))
    while not sched.idle():
        sched.step()
        sched.batch.check()
    assert engine.graphs.replays == sched.stats()["iterations"] > 0
    assert got == want


@pytest.mark.parametrize("mode, pdl", [("on", True), ("on", False), ("off", True), ("on", 2)])
def test_triton_projections_and_pdl_greedy_tokens_equal_eager_fp32(mode: str, pdl: bool | int) -> None:
    """gemv "on": every projection through the skinny Triton kernel (split-K partials, SiLU in the epilogue, the
    head straight into the logits); pdl: every Triton kernel launched with programmatic dependent launch (2:
    fused.PDL_LATE, the projections and attention letting the next kernel launch after their main loop). In
    float32, so greedy tokens must match the eager path."""
    from services.engine.graphs import DecodeGraphs

    g = torch.Generator().manual_seed(11)
    prompts = [torch.randint(3, 384, (int(n),), generator=g).tolist() for n in (7, 90, 140)]
    eager = _greedy(_engine(torch.float32, graphs=False), prompts, 40)
    fast_engine = _engine(torch.float32, graphs=True)
    fast_engine.graphs = DecodeGraphs(fast_engine.model, mode, pdl)
    assert _greedy(fast_engine, prompts, 40) == eager
    plan = fast_engine.graphs.plans[4]
    kept = fast_engine.graphs.step_choice[4]
    assert (kept["plan"], kept["pdl"]) == (mode, pdl) and "replay_us" not in kept  # one variant: nothing to time
    if mode == "on":
        assert all(c.kernel == "skinny" for c in plan.choices.values()) and plan.choices["mlp_in"].silu


@pytest.mark.parametrize("sms", [2, 4, 64])
def test_attention_tilings_greedy_tokens_equal_eager_fp32(sms: int) -> None:
    """graphs.attn_tiles for a chip of `sms` multiprocessors, so that 3 rows x 2 KV heads take each "tuned" tiling:
    one unsplit program per pair in 64-key tiles (2), in 128-key tiles (4), key splits (64). The graphed step's
    float32 greedy tokens equal eager, and the kept step records no error."""
    from services.engine.graphs import DecodeGraphs, attn_tiles

    g = torch.Generator().manual_seed(23)
    prompts = [torch.randint(3, 384, (int(n),), generator=g).tolist() for n in (9, 130, 70)]
    eager = _greedy(_engine(torch.float32, graphs=False), prompts, 40)
    fast = _engine(torch.float32, graphs=True)
    fast.graphs = DecodeGraphs(fast.model, "on", True)
    fast.graphs.sms = sms
    tiles = attn_tiles(4, 2, sms)
    assert (tiles["splits"] == 1) == (sms < 16) and tiles["block_n"] == (128 if sms == 4 else 64)
    assert _greedy(fast, prompts, 40) == eager
    assert "errors" not in fast.graphs.step_choice[4]


def test_auto_plan_times_cublas_and_the_triton_candidates_bf16() -> None:
    from services.engine import gemv

    engine = _engine(torch.bfloat16, graphs=True)
    kv = engine.new_kv(2, 128)
    engine.prefill([[5, 6, 7], [8, 9]], kv, [0, 1])
    engine.decode([1, 2], kv, slice(0, 2))
    plan = engine.graphs.plans[2]
    fm = engine.graphs.fused
    for unit in gemv.UNITS:
        if gemv.candidates(fm, unit, 2, engine.graphs.sms):
            assert "cublas" in plan.timings_us[unit] and len(plan.timings_us[unit]) >= 2, plan.summary()
            best = min(plan.timings_us[unit], key=plan.timings_us[unit].get)
            assert plan.choices[unit].label() == best
    assert not any("relative error" in why for r in plan.rejected.values() for why in r.values()), plan.rejected
    kept = engine.graphs.step_choice[2]  # every variant captured and replayed; the fastest kept
    assert "errors" not in kept, kept
    times = kept["replay_us"]
    assert {"auto", "auto pdl", "auto pdl late"} <= set(times) and len(times) in (3, 6), kept
    # the kept variant has the least replay time (times are rounded to 0.1 us: another may tie with it)
    label = {False: "", True: " pdl", 2: " pdl late"}[kept["pdl"]]
    assert times[kept["plan"] + label] == min(times.values()), kept
