"""BAC logic: the ACS dynamic program against brute force, Bubbling Union containment, cache exactness."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from services.policy.bac import (
    CacheHook,
    acs_steps,
    block_evals,
    brute_force_steps,
    bubbling_union,
    cosine_matrix,
    full_plan,
    make_plans,
    plan_from_steps,
    reuse_error,
    schedule_score,
    segment_gain,
    uniform_steps,
)
from services.policy.model import Denoiser, DenoiserConfig
from services.policy.sampler import denoise, draw_noise
from services.policy.schedule import ddim, ddpm


def random_sim(k: int, rng: np.random.Generator) -> np.ndarray:
    f = rng.normal(size=(k, 6)).cumsum(0)  # a drifting feature: similarity decays with distance
    f /= np.linalg.norm(f, axis=1, keepdims=True)
    return f @ f.T


def test_segment_gain_is_row_sums() -> None:
    sim = random_sim(7, np.random.default_rng(1))
    g = segment_gain(sim)
    for a in range(7):
        for b in range(a, 7):
            assert g[a, b] == pytest.approx(sim[a, a:b + 1].sum())
        assert np.all(np.isneginf(g[a, :a]))


@pytest.mark.parametrize("k", [4, 6, 9, 11])
def test_dp_equals_brute_force(k: int) -> None:
    rng = np.random.default_rng(k)
    for _ in range(5):
        sim = random_sim(k, rng)
        for budget in range(2, k):
            steps = acs_steps(sim, budget)
            ref, best = brute_force_steps(sim, budget)
            assert len(steps) == budget and steps[0] == 0 and steps[-1] == k - 1
            assert schedule_score(sim, steps) == pytest.approx(best, abs=1e-12), (steps, ref)


def test_dp_prefers_refreshing_where_features_change() -> None:
    # features constant on [0, 5) and on [5, 12): one extra refresh belongs exactly at the change point
    sim = np.zeros((12, 12))
    sim[:5, :5] = 1
    sim[5:, 5:] = 1
    assert acs_steps(sim, 3) == [0, 5, 11]
    assert acs_steps(sim, 12) == list(range(12))
    with pytest.raises(ValueError, match="budget"):
        acs_steps(sim, 1)


def test_uniform_steps() -> None:
    assert uniform_steps(100, 5) == [0, 25, 50, 74, 99]
    assert len(uniform_steps(100, 10)) == 10
    assert uniform_steps(4, 10) == [0, 1, 2, 3]


def test_bubbling_union_contains_acs_and_adds_deeper_ffn_steps() -> None:
    per_block = [[0, 10 + b, 99] for b in range(9)]  # 3 layers x (sa, ca, ffn)
    errors = [0.0] * 9
    errors[1], errors[3] = 5.0, 4.0  # L0.ca and L1.sa are the worst
    out, chosen = bubbling_union(per_block, errors, top_n=2)
    assert chosen == [1, 3]
    for a, b in zip(per_block, out, strict=True):
        assert set(a) <= set(b)
    assert set(out[1]) == {0, 99, 11, 12, 15, 18}  # its own + the FFNs of layers 0, 1, 2
    assert set(out[3]) == {0, 99, 13, 15, 18}  # its own + the FFNs of layers 1, 2
    assert out[0] == per_block[0] and out[8] == per_block[8]


def test_wider_bubbling_union_nests_and_saturates() -> None:
    """Widening the union only adds blocks and steps; at width >= n_blocks - 1 every upstream block is
    refreshed with all FFN steps at its layer or deeper, and the last FFN keeps its own schedule."""
    rng = np.random.default_rng(3)
    n_blocks, k = 12, 40  # 4 layers
    per_block = [sorted({0, k - 1, *rng.choice(np.arange(1, k - 1), 5, replace=False).tolist()})
                 for _ in range(n_blocks)]
    errors = rng.random(n_blocks).tolist()
    prev, prev_chosen = per_block, []
    for n in range(0, n_blocks + 3):
        out, chosen = bubbling_union(per_block, errors, n)
        assert set(prev_chosen) <= set(chosen) and len(chosen) == min(n, n_blocks - 1)
        assert all(set(a) <= set(b) for a, b in zip(prev, out, strict=True))
        prev, prev_chosen = out, chosen
    assert prev_chosen == list(range(n_blocks - 1))
    for b in range(n_blocks - 1):
        ffn = {s for f in range(3 * (b // 3) + 2, n_blocks, 3) for s in per_block[f]}
        assert set(prev[b]) == set(per_block[b]) | ffn
    assert prev[-1] == per_block[-1]
    # the width decides which blocks get unions: the top-4 by error are exactly those changed at n = 4
    out4, chosen4 = bubbling_union(per_block, errors, 4)
    assert chosen4 == sorted(np.argsort(errors[:-1])[::-1][:4].tolist())
    assert {b for b in range(n_blocks) if out4[b] != per_block[b]} <= set(chosen4)


def test_statistics() -> None:
    outs = torch.randn(6, 3, 4, 5)
    sim = cosine_matrix(outs)
    assert np.allclose(np.diag(sim), 1) and np.allclose(sim, sim.T)
    assert reuse_error(outs, list(range(6))) == 0.0
    assert reuse_error(outs, [0, 5]) > 0.0


def tiny_model() -> Denoiser:
    torch.manual_seed(0)
    model = Denoiser(DenoiserConfig(n_layer=2, n_emb=32, n_head=2)).eval()
    for p in model.parameters():  # random, not near-zero, so every block matters
        torch.nn.init.normal_(p, std=0.3)
    return model


@pytest.mark.parametrize("sampler", [ddpm(), ddim(10)], ids=["ddpm100", "ddim10"])
def test_update_every_step_is_bitwise_uncached(sampler) -> None:
    model = tiny_model()
    obs = torch.randn(3, 2, 7)
    noise = draw_noise(sampler, 3, 16, 2, seed=4)
    ref = denoise(model, sampler, obs, noise)
    hook = CacheHook(full_plan(sampler.steps, model.cfg.n_blocks))
    assert torch.equal(denoise(model, sampler, obs, noise, hook), ref)
    assert hook.evals == sampler.steps * model.cfg.n_blocks


def test_reuse_changes_output_and_counts_evals() -> None:
    model, sampler = tiny_model(), ddim(10)
    obs, noise = torch.randn(2, 2, 7), draw_noise(sampler, 2, 16, 2, seed=5)
    plan = plan_from_steps([[0, 4, 9]] * model.cfg.n_blocks, sampler.steps)
    hook = CacheHook(plan)
    out = denoise(model, sampler, obs, noise, hook)
    assert hook.evals == block_evals(plan) == 3 * model.cfg.n_blocks
    assert not torch.allclose(out, denoise(model, sampler, obs, noise))


def test_make_plans_from_recording() -> None:
    from services.policy.bac import RecordHook

    model, sampler = tiny_model(), ddim(10)
    rec = RecordHook(model.cfg.n_blocks)
    denoise(model, sampler, torch.randn(2, 2, 7), draw_noise(sampler, 2, 16, 2, seed=6), rec)
    outs = [rec.stacked(b) for b in range(model.cfg.n_blocks)]
    assert outs[0].shape == (10, 2, 16, 32)
    plans = make_plans(outs, budget=4, top_n=2)
    assert set(plans) == {"acs", "bac", "bac-n6", "unified", "uniform"}  # bac-n6: the wider-BU ablation
    for m in ("acs", "unified", "uniform"):
        assert all(len(s) == 4 and s[0] == 0 and s[-1] == 9 for s in plans[m]["steps"])
    assert len(plans["bac"]["bu_blocks"]) == 2
    for bu in ("bac", "bac-n6"):
        assert all(set(a) <= set(b) for a, b in zip(plans["acs"]["steps"], plans[bu]["steps"], strict=True))
    assert len(plans["bac-n6"]["bu_blocks"]) == 5  # every block but the last FFN
    wide = make_plans(outs, budget=4, top_n=1, widths=(2, 4))
    assert set(wide) == {"acs", "bac", "bac-n2", "bac-n4", "unified", "uniform"}
    assert wide["acs"] == plans["acs"] and wide["uniform"] == plans["uniform"]
    for narrow, broad in (("bac", "bac-n2"), ("bac-n2", "bac-n4")):
        assert set(wide[narrow]["bu_blocks"]) <= set(wide[broad]["bu_blocks"])
        assert all(set(a) <= set(b) for a, b in zip(wide[narrow]["steps"], wide[broad]["steps"], strict=True))


def test_screen_rows_per_width_and_uniform() -> None:
    """`tandem policy screen` core: one row per (S, width) and per uniform budget; wider unions cost more
    evaluations; a plan that computes every step has zero error."""
    from services.bench import policy as bench
    from services.policy import task
    from services.policy.sampler import Normalizer

    model = tiny_model()
    obs, act = task.demonstrations(3, 16)
    norm = Normalizer.fit(obs, act)
    rows = bench.screen(model, norm, budgets=[4, 20], widths=[1, 5], uniform=[4], sampler_key="ddim20", n_obs=4,
                        n_mse=4, dev_episodes=2, progress=lambda _: None)
    by = {r["config"]: r for r in rows}
    assert list(by) == ["ddim20/bac-n1/S=4", "ddim20/bac-n5/S=4", "ddim20/bac-n1/S=20", "ddim20/bac-n5/S=20",
                        "ddim20/uniform/S=4"]
    assert by["ddim20/bac-n1/S=4"]["block_evals"] <= by["ddim20/bac-n5/S=4"]["block_evals"]
    assert by["ddim20/uniform/S=4"]["block_evals"] == 4 * model.cfg.n_blocks
    assert by["ddim20/bac-n5/S=20"]["block_evals"] == 20 * model.cfg.n_blocks
    assert by["ddim20/bac-n5/S=20"]["mse_max"] == 0.0  # S = K: every block every step, bitwise uncached
    assert by["ddim20/uniform/S=4"]["mse_median"] > 0.0
    for r in rows:
        assert r["n_obs"] == 8 and r["mse_max"] >= r["mse_p90"] >= r["mse_median"] >= 0.0
        assert 0.0 <= r["dev_success"] <= 1.0 and r["dev_ci95"][0] <= r["dev_success"] <= r["dev_ci95"][1]
