"""The skinny projection kernel and the per-bucket kernel plans (services.engine.gemv).

The shape rules and the plan modes run anywhere; the kernels run on the CPU under TRITON_INTERPRET=1 with triton
installed (skipped otherwise), against PyTorch. The interpreter's bf16 dot is wrong, so 16-bit cases use fp16:
the kernel's code path is the same for both.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from kit.checkpoints import tiny_config

from services.engine import gemv
from services.engine.engine import Engine, random_engine
from services.engine.fused import TORCH_OPS, decode_step, fuse_weights

interpreted = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs triton with TRITON_INTERPRET=1")
PROMPTS = [[5, 6, 7, 8, 9], [10, 11], list(range(20, 90))]


def _kernels():
    pytest.importorskip("triton")
    from services.engine import kernels

    return kernels


def _engine(**overrides) -> Engine:
    return random_engine(tiny_config(**overrides), seed=1)


def _llama_like():
    """A FusedModel view with Llama-3.2-1B's projection shapes but 2 layers, on the meta device (no memory)."""
    from services.engine.config import ModelConfig
    from services.engine.model import Transformer

    cfg = ModelConfig(vocab_size=128256, dim=2048, n_layers=2, n_heads=32, n_kv_heads=8, hidden_dim=8192,
                      max_seq_len=64, rope_theta=500000.0, norm_eps=1e-5, bos_id=None, eos_ids=(2,),
                      tie_embeddings=True)
    with torch.device("meta"):
        model = Transformer(cfg)
    return fuse_weights(model)


# ---- shape rules and modes (no Triton needed) ----

def test_candidates_divide_k_fill_the_chip_and_stop_past_64_rows() -> None:
    fm = _llama_like()
    for unit in gemv.UNITS:
        n, k = gemv.unit_shape(fm, unit)
        cands = gemv.candidates(fm, unit, 8, 132)
        assert cands, unit
        for c in cands:
            assert c.kernel == "skinny" and k % (c.bk * c.split) == 0
            if unit == "head" or c.silu:
                assert c.split == 1
            else:  # at least one program per multiprocessor, unless K cannot be split further
                assert -(-n // c.bn) * c.split >= 132 or k % (c.bk * c.split * 2)
        assert gemv.candidates(fm, unit, 65, 132) == []
    assert any(c.silu for c in gemv.candidates(fm, "mlp_in", 1, 132))
    assert {c.split for c in gemv.candidates(fm, "o", 1, 132) if c.bn == 64} == {8, 16}  # 32 blocks of 64 rows


def test_heuristic_and_biased_qkv() -> None:
    fm = _llama_like()
    c = gemv.heuristic(fm, "o", 1, 132)
    assert (c.kernel, c.bn, c.bk, c.split) == ("skinny", 64, 128, 16)  # 32 blocks x 16 >= 2 x 132
    assert gemv.heuristic(fm, "mlp_in", 4, 132).silu
    assert gemv.heuristic(fm, "head", 4, 132).split == 1
    assert gemv.heuristic(fm, "qkv", 65, 132) == gemv.Choice()
    biased = fuse_weights(_engine(attention_bias=True).model)
    assert gemv.heuristic(biased, "qkv", 1, 132) == gemv.Choice() and gemv.candidates(biased, "qkv", 1, 132) == []


def test_plan_modes_and_their_errors() -> None:
    fm = fuse_weights(_engine().model)
    off = gemv.plan_for(fm, 4, "off", None, None, 132, TORCH_OPS)
    assert all(c.kernel == "cublas" for c in off.choices.values()) and set(off.choices) == set(gemv.UNITS)
    on = gemv.plan_for(fm, 4, "on", None, None, 132, TORCH_OPS)
    assert {u for u, c in on.choices.items() if c.kernel == "skinny"} == set(gemv.UNITS)
    assert gemv.plan_for(fm, 4, "on", None, None, 132, TORCH_OPS) is on  # one plan per shapes, rows and mode
    auto = gemv.plan_for(fm, 4, "auto", None, None, 132, TORCH_OPS)  # float32 weights: cuBLAS, nothing timed
    assert all(c.kernel == "cublas" for c in auto.choices.values()) and auto.timings_us == {}
    with pytest.raises(ValueError, match="gemv mode"):
        gemv.plan_for(fm, 4, "fast", None, None, 132, TORCH_OPS)
    assert gemv.bind(off.choices, TORCH_OPS).qkv is TORCH_OPS.qkv
    assert on.summary()["choices"]["mlp_in"].endswith("silu")


def test_torch_reference_sums_partials_with_one_rounding() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 32, generator=g).to(torch.bfloat16)
    parts = torch.randn(4, 3, 32, generator=g)
    s, _ = TORCH_OPS.add_rmsnorm(x, parts, torch.ones(32, dtype=torch.bfloat16), 1e-5)
    assert s.dtype == torch.bfloat16 and torch.equal(s, (x.float() + parts.sum(0)).to(torch.bfloat16))
    gu = torch.randn(2, 3, 64, generator=g)
    want = TORCH_OPS.silu_mul(gu.sum(0).to(torch.bfloat16))
    assert torch.equal(TORCH_OPS.silu_mul(gu, torch.bfloat16), want)


# ---- the kernels in the interpreter ----

@interpreted
def test_max_rows_agree() -> None:
    assert _kernels().SKINNY_MAX_ROWS == gemv.MAX_ROWS


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("rows", [1, 5, 16, 33])
def test_skinny_linear_matches_torch(dtype: torch.dtype, rows: int) -> None:
    k = _kernels()
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 256, generator=g).to(dtype)
    w = (torch.randn(80, 256, generator=g) * 0.05).to(dtype)  # 80 rows: the last 64-row block is partly masked
    want = F.linear(x.float(), w.float())
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-3, "atol": 2e-3}
    for bn, bk, split in [(64, 128, 1), (32, 64, 2), (16, 32, 8), (64, 16, 4)]:
        p = k.skinny_linear(x, w, bn=bn, bk=bk, split=split)
        assert p.shape == (split, rows, 80) and p.dtype == torch.float32
        torch.testing.assert_close(p.sum(0), want, **tol)
    direct = k.skinny_linear(x, w, bn=32, bk=128, partials=False)
    assert direct.dtype == dtype
    torch.testing.assert_close(direct.float(), want, **tol)
    buf = torch.full((rows, 100), 7.0, dtype=dtype)  # rows of a wider buffer: the rest is left alone
    k.skinny_linear(x, w, bn=64, bk=64, partials=False, out=buf[:, :80])
    torch.testing.assert_close(buf[:, :80].float(), want, **tol)
    assert torch.all(buf[:, 80:] == 7.0)


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("rows", [1, 6])
def test_skinny_silu_epilogue_rounds_as_eager(dtype: torch.dtype, rows: int) -> None:
    k = _kernels()
    g = torch.Generator().manual_seed(7)
    x = torch.randn(rows, 128, generator=g).to(dtype)
    wgu = (torch.randn(2 * 48, 128, generator=g) * 0.1).to(dtype)  # hidden 48: masked rows in a 32-row block
    want = TORCH_OPS.mlp_in(x, wgu)
    fused = k.skinny_linear(x, wgu, bn=32, bk=64, silu=True)
    assert fused.shape == (rows, 48) and fused.dtype == dtype
    # the same rounding steps as eager: only the products' float32 sums may differ
    torch.testing.assert_close(fused, want, rtol=1e-5 if dtype == torch.float32 else 2e-3, atol=1e-5)
    parts = k.silu_mul(k.skinny_linear(x, wgu, bn=64, bk=32, split=4), dtype)
    torch.testing.assert_close(parts, TORCH_OPS.silu_mul(F.linear(x.float(), wgu.float())[None], dtype),
                               rtol=1e-5 if dtype == torch.float32 else 2e-3, atol=1e-5)


@interpreted
def test_skinny_linear_refuses_what_it_cannot_do() -> None:
    k = _kernels()
    x, w = torch.randn(3, 256), torch.randn(64, 256)
    with pytest.raises(ValueError, match="multiple"):
        k.skinny_linear(x, w, bk=128, split=4)
    with pytest.raises(ValueError, match="rows"):
        k.skinny_linear(torch.randn(65, 256), w)
    with pytest.raises(ValueError, match="split 1"):
        k.skinny_linear(x, w, split=2, partials=False)
    with pytest.raises(ValueError, match="contiguous"):
        k.skinny_linear(x, torch.randn(256, 64).t())


@interpreted
def test_rope_kv_and_add_rmsnorm_sum_partials_like_the_reference() -> None:
    k = _kernels()
    from services.engine.fused import rope_tables

    g = torch.Generator().manual_seed(3)
    H, Hkv, D, rows = 4, 2, 16, 3
    parts = torch.randn(4, rows, (H + 2 * Hkv) * D, generator=g)
    inv = 1.0 / (10000 ** (torch.arange(0, D, 2).float() / D))
    cos, sin = rope_tables(inv, 64)
    pos, slot = torch.tensor([5, -1, 9]), torch.tensor([2, 0, 1])
    caches = [torch.zeros(3, 64, Hkv, D) for _ in range(4)]
    q_ref = TORCH_OPS.rope_kv(parts, pos, slot, cos, sin, caches[0], caches[1], H, Hkv)
    q = k.rope_kv(parts, pos, slot, cos, sin, caches[2], caches[3], H, Hkv)
    torch.testing.assert_close(q, q_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(caches[2], caches[0], rtol=1e-6, atol=1e-6)
    assert torch.all(caches[2][0] == 0)  # slot 0 belongs to the padding row
    x = torch.randn(rows, 64, generator=g)
    a = torch.randn(3, rows, 64, generator=g)
    w = torch.rand(64, generator=g)
    for got, want in zip(k.add_rmsnorm(x, a, w, 1e-5), TORCH_OPS.add_rmsnorm(x, a, w, 1e-5), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@interpreted
@pytest.mark.parametrize("silu", [True, False])
def test_decode_step_with_skinny_projections_matches_eager(silu: bool) -> None:
    from services.engine.fused import triton_ops

    _kernels()
    engine = _engine(hidden_dim=192, tie_embeddings=True)
    kv = engine.new_kv(len(PROMPTS), 128)
    engine.prefill(PROMPTS, kv, list(range(len(PROMPTS))))
    eager_kv = engine.new_kv(3, 128)
    fused_kv = engine.new_kv(4, 128)  # a fourth slot for the padding row
    for dst in (eager_kv, fused_kv):
        dst.k[:, :3].copy_(kv.k)
        dst.v[:, :3].copy_(kv.v)
    eager_kv.lengths = list(kv.lengths)
    want = engine.decode([1, 2, 3], eager_kv, slice(0, 3))
    fm = fuse_weights(engine.model)
    plan = gemv.plan_for(fm, 4, "on", None, None, 132, TORCH_OPS)
    choices = dict(plan.choices)
    if not silu:
        choices["mlp_in"] = gemv.Choice("skinny", 32, 32, 2)
    choices["down"] = gemv.Choice("skinny", 16, 32, 2)
    assert all(c.kernel == "skinny" for c in choices.values())
    ops = gemv.bind(choices, triton_ops())
    got = decode_step(fm, ops, torch.tensor([1, 2, 3, 0]), torch.tensor(kv.lengths + [-1]), torch.arange(4),
                      fused_kv.k, fused_kv.v, 2)
    torch.testing.assert_close(got[:3].float(), want, rtol=1e-4, atol=1e-4)
    n = max(eager_kv.lengths)
    torch.testing.assert_close(fused_kv.k[:, :3, :n], eager_kv.k[:, :, :n], rtol=1e-5, atol=1e-5)
    assert torch.all(fused_kv.k[:, 3] == 0)


@interpreted
def test_auto_plan_checks_and_times_every_candidate_and_keeps_the_fastest(monkeypatch: pytest.MonkeyPatch) -> None:
    """The measuring path on the CPU: the CUDA-graph timer is replaced by one that runs the timed loop (so every
    candidate's loop runs through the interpreter) and reports ever smaller times, so the last candidate that
    survives the checks must win. A config that cannot compile and one with a wrong product are rejected."""
    from services.engine.fused import triton_ops

    _kernels()
    engine = random_engine(tiny_config(dim=128, n_heads=4, n_kv_heads=2, head_dim=32, hidden_dim=256, vocab_size=256), seed=2,
                           dtype=torch.float16)
    fm = fuse_weights(engine.model)
    kv = engine.new_kv(4, 32)
    clock = iter(range(10_000, 0, -1))
    ran: list[int] = []

    def fake_time(fn, dev):
        fn()
        ran.append(1)
        return float(next(clock))

    real = gemv.projection

    def projection(unit, c, base):
        if unit == "o" and c.bn == 128:  # a kernel that computes the wrong thing
            return lambda x, w: torch.zeros(c.split, x.shape[0], w.shape[0])
        return real(unit, c, base)

    monkeypatch.setattr(gemv, "_graph_time_us", fake_time)
    monkeypatch.setattr(gemv, "projection", projection)
    monkeypatch.setattr(gemv, "SILU_CONFIGS", ((64, 128, 4, 3), (48, 128, 4, 3)))  # 48: not a power of 2
    base = triton_ops()
    base.down = TORCH_OPS.down  # torch.bmm's float32 out_dtype (the cuBLAS split-K down) is CUDA-only
    plan = gemv.plan_for(fm, 4, "auto", kv.k, kv.v, 4, base)
    for unit in gemv.UNITS:
        cands = gemv.candidates(fm, unit, 4, 4)
        kept = [c for c in cands if c.label() not in plan.rejected.get(unit, {})]
        assert list(plan.timings_us[unit]) == ["cublas"] + [c.label() for c in kept]
        assert plan.choices[unit] == kept[-1]
    assert all("relative error" in why for why in plan.rejected["o"].values()) and plan.rejected["o"]
    assert list(plan.rejected["mlp_in"]) == ["skinny bn48 bk128 split1 w4 s3 silu"]
    assert len(ran) == sum(len(t) for t in plan.timings_us.values())
    assert plan.summary()["choices"]["head"].startswith("skinny")
