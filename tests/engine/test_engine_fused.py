"""The fused decode/prefill step on CPU: fused weights, the step's structure, padding rows, batch buckets.

The Triton kernels share the reference ops' signatures; with TRITON_INTERPRET=1 and triton installed the
last test runs them on the CPU against the eager model too (CI has no triton, so it skips there).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from kit.checkpoints import tiny_config

from services.engine.engine import Engine, random_engine
from services.engine.fused import TORCH_OPS, decode_step, fuse_weights, prefill_step
from services.engine.graphs import BUCKETS, attn_splits, bucket_for

PROMPTS = [[5, 6, 7, 8, 9], [10, 11], list(range(20, 90))]  # the last spans two 64-key attention blocks


def _engine(**overrides) -> Engine:
    return random_engine(tiny_config(**overrides), seed=1)


def _prefilled(engine: Engine, capacity: int = 128):
    kv = engine.new_kv(len(PROMPTS), capacity)
    engine.prefill(PROMPTS, kv, list(range(len(PROMPTS))))
    return kv


def _copy(engine: Engine, kv):
    out = engine.new_kv(kv.slots, kv.capacity)
    out.k.copy_(kv.k)
    out.v.copy_(kv.v)
    out.lengths = list(kv.lengths)
    return out


def test_fusing_keeps_names_memory_and_eager_results() -> None:
    engine = _engine(attention_bias=True)
    kv = _prefilled(engine)
    before_state = {k: v.clone() for k, v in engine.model.state_dict().items()}
    before = engine.decode([1, 2, 3], _copy(engine, kv), slice(0, 3))
    n_params = sum(p.numel() for p in engine.model.parameters())
    fm = fuse_weights(engine.model)
    a = engine.model.layers[0].self_attn
    assert a.q_proj.weight.data_ptr() == fm.layers[0].wqkv.data_ptr()  # a row slice of the fused matrix
    offset = (a.q_proj.out_features + a.k_proj.out_features) * a.v_proj.bias.element_size()
    assert a.v_proj.bias.data_ptr() == fm.layers[0].bqkv.data_ptr() + offset
    assert fm.layers[0].wgu.shape == (2 * engine.cfg.hidden_dim, engine.cfg.dim)
    assert sum(p.numel() for p in engine.model.parameters()) == n_params
    after_state = engine.model.state_dict()
    assert after_state.keys() == before_state.keys()
    assert all(torch.equal(after_state[k], v) for k, v in before_state.items())
    assert torch.equal(engine.decode([1, 2, 3], _copy(engine, kv), slice(0, 3)), before)  # eager: bit for bit
    again = fuse_weights(engine.model)  # idempotent: the same fused tensors, no new copy
    assert again.layers[1].wqkv.data_ptr() == fm.layers[1].wqkv.data_ptr()
    engine.model.layers[1].self_attn.k_proj.weight.data[0, 0] = 7.0  # a parameter write lands in the fused matrix
    assert fm.layers[1].wqkv[engine.model.layers[1].self_attn.q_proj.out_features, 0] == 7.0


@pytest.mark.parametrize("overrides", [{}, {"n_kv_heads": 4}, {"tie_embeddings": True, "attention_bias": True}])
def test_fused_decode_step_matches_eager(overrides: dict) -> None:
    engine = _engine(**overrides)
    kv = _prefilled(engine)
    eager_kv, fused_kv = _copy(engine, kv), _copy(engine, kv)
    want = engine.decode([1, 2, 3], eager_kv, slice(0, 3))
    fm = fuse_weights(engine.model)
    pos = torch.tensor(fused_kv.lengths)
    with torch.inference_mode():
        got = decode_step(fm, TORCH_OPS, torch.tensor([1, 2, 3]), pos, torch.arange(3), fused_kv.k, fused_kv.v)
    torch.testing.assert_close(got.float(), want, rtol=1e-5, atol=1e-5)
    n = max(eager_kv.lengths)
    torch.testing.assert_close(fused_kv.k[:, :, :n], eager_kv.k[:, :, :n])
    torch.testing.assert_close(fused_kv.v[:, :, :n], eager_kv.v[:, :, :n])


def test_padding_rows_write_nothing_and_change_nothing() -> None:
    engine = _engine()
    kv = _prefilled(engine)
    fm = fuse_weights(engine.model)
    live = _copy(engine, kv)
    padded = _copy(engine, kv)
    padded.resize(4, padded.capacity)  # a fourth slot the padding row would write to, were it live
    padded.k[:, 3].fill_(0.5)
    with torch.inference_mode():
        a = decode_step(fm, TORCH_OPS, torch.tensor([1, 2, 3]), torch.tensor(live.lengths), torch.arange(3),
                        live.k, live.v)
        b = decode_step(fm, TORCH_OPS, torch.tensor([1, 2, 3, 9]), torch.tensor(live.lengths + [-1]), torch.arange(4),
                        padded.k, padded.v)
    torch.testing.assert_close(b[:3], a)
    assert torch.all(padded.k[:, 3] == 0.5)


def test_fused_prefill_matches_eager_into_any_slots() -> None:
    engine = _engine()
    kv = engine.new_kv(4, 96)
    want = engine.prefill(PROMPTS, kv, [2, 0, 3])
    fm = fuse_weights(engine.model)
    t = max(map(len, PROMPTS))
    tokens = torch.zeros(3, t, dtype=torch.long)
    for i, p in enumerate(PROMPTS):
        tokens[i, :len(p)] = torch.tensor(p)
    got_kv = engine.new_kv(4, 96)
    with torch.inference_mode():
        got = prefill_step(fm, TORCH_OPS, tokens, torch.tensor([2, 0, 3]),
                           torch.tensor([len(p) - 1 for p in PROMPTS]), got_kv.k, got_kv.v)
    torch.testing.assert_close(got.float(), want, rtol=1e-5, atol=1e-5)
    for slot, p in zip([2, 0, 3], PROMPTS, strict=True):
        torch.testing.assert_close(got_kv.k[:, slot, :len(p)], kv.k[:, slot, :len(p)])


def test_bucket_for_covers_every_batch_with_the_smallest_bucket() -> None:
    assert [bucket_for(n) for n in (1, 2, 3, 5, 8, 9, 17, 33, 64, 65, 100)] == [1, 2, 4, 8, 8, 16, 24, 40, 64, 96, 128]
    for n in range(1, 300):
        b = bucket_for(n)
        assert b >= n and not any(n <= c < b for c in BUCKETS)
    with pytest.raises(ValueError):
        bucket_for(0)


def test_attention_splits_fill_the_chip_and_stay_powers_of_two() -> None:
    assert attn_splits(1, 8, 132) == 16  # 8 programs would idle most of 132 multiprocessors
    assert attn_splits(64, 8, 132) == 1  # 512 programs already cover them
    for rows in range(1, 130):
        s = attn_splits(rows, 8, 132)
        assert s & (s - 1) == 0 and 1 <= s <= 16
        assert s == 16 or rows * 8 * s >= 2 * 132


def test_attention_tiles_by_pairs_per_multiprocessor() -> None:
    """attn_tiles: few (row, KV head) pairs keep attn_splits' key splits; from half a pair per multiprocessor on,
    one unsplit program per pair, 128-key tiles up to two pairs per multiprocessor, 64 above; "legacy" is the
    step before; an unknown mode is refused by name, by DecodeGraphs too (before any model work)."""
    from services.engine.graphs import DecodeGraphs, attn_tiles

    assert attn_tiles(8, 8, 132) == {"splits": attn_splits(8, 8, 132), "block_n": 64, "num_stages": 2,
                                     "hk_fast": True}
    assert attn_tiles(16, 8, 132) == {"splits": 1, "block_n": 128, "num_stages": 3, "hk_fast": True}
    assert attn_tiles(33, 8, 132)["splits"] == 1 and attn_tiles(33, 8, 132)["block_n"] == 128
    assert attn_tiles(34, 8, 132)["block_n"] == 64 and attn_tiles(64, 8, 132)["block_n"] == 64
    for rows in (1, 8, 16, 64):
        assert attn_tiles(rows, 8, 132, "legacy") == {"splits": attn_splits(rows, 8, 132), "block_n": 64,
                                                      "num_stages": 2, "hk_fast": False}
    with pytest.raises(ValueError, match="attention mode must be one of tuned, legacy"):
        attn_tiles(1, 8, 132, "fast")
    with pytest.raises(ValueError, match="attention mode"):
        DecodeGraphs(None, attn="fast")  # type: ignore[arg-type]


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs triton with TRITON_INTERPRET=1")
@pytest.mark.parametrize("splits", [1, 4])
def test_triton_kernels_match_eager_in_the_interpreter(splits: int) -> None:
    pytest.importorskip("triton")
    from services.engine.fused import triton_ops

    engine = _engine()
    kv = _prefilled(engine)
    eager_kv, fused_kv = _copy(engine, kv), _copy(engine, kv)
    fused_kv.resize(4, fused_kv.capacity)
    want = engine.decode([1, 2, 3], eager_kv, slice(0, 3))
    fm = fuse_weights(engine.model)
    pos = torch.tensor(kv.lengths + [-1])
    got = decode_step(fm, triton_ops(), torch.tensor([1, 2, 3, 0]), pos, torch.arange(4), fused_kv.k, fused_kv.v,
                      splits)
    torch.testing.assert_close(got[:3].float(), want, rtol=1e-4, atol=1e-4)
    n = max(eager_kv.lengths)
    torch.testing.assert_close(fused_kv.k[:, :3, :n], eager_kv.k[:, :, :n], rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs triton with TRITON_INTERPRET=1")
@pytest.mark.parametrize("dtype, parts, D", [(torch.float32, 0, 32), (torch.float32, 3, 32), (torch.float16, 0, 32),
                                             (torch.float16, 4, 64), (torch.float32, 2, 16)])
def test_rope_attention_kernel_equals_rope_kv_then_attention(dtype: torch.dtype, parts: int, D: int) -> None:
    """One kernel for RoPE + the KV write + attention: the caches bit for bit as the rope_kv kernel leaves them and
    the output of rope_kv then decode_attention (and of the PyTorch reference), for a product or its float32
    split-K partials, ragged lengths (the new token at the first key, inside a block, on a block edge), a padding
    row, key splits 1 and 4, head widths 16 to 64."""
    pytest.importorskip("triton")
    from services.engine import kernels
    from services.engine.fused import TORCH_OPS, rope_tables

    g = torch.Generator().manual_seed(5)
    H, Hkv, rows, cap = 4, 2, 5, 160
    inv = 1.0 / (10000 ** (torch.arange(0, D, 2).float() / D))
    cos, sin = rope_tables(inv, cap)
    width = (H + 2 * Hkv) * D
    qkv = torch.randn(parts, rows, width, generator=g) if parts else torch.randn(rows, width, generator=g).to(dtype)
    pos, slot = torch.tensor([0, 63, 64, -1, 130]), torch.arange(rows)
    base = torch.randn(2, rows, cap, Hkv, D, generator=g).to(dtype)
    for splits in (1, 4):
        caches = [t.clone() for t in (base[0], base[1]) for _ in range(3)]
        ref_k, k_2, k_c, ref_v, v_2, v_c = caches
        want = TORCH_OPS.rope_attention(qkv, pos, slot, cos, sin, ref_k, ref_v, H, Hkv, splits)
        q = kernels.rope_kv(qkv, pos, slot, cos, sin, k_2, v_2, H, Hkv)
        two = kernels.decode_attention(q, k_2, v_2, pos, splits, block_n=16)
        got = kernels.rope_attention(qkv, pos, slot, cos, sin, k_c, v_c, H, Hkv, splits, block_n=16)
        grid3 = kernels.rope_attention(qkv, pos, slot, cos, sin, k_c.clone(), v_c.clone(), H, Hkv, splits,
                                       block_n=16, hk_fast=False)
        assert torch.equal(grid3, got)  # the program order changes nothing computed
        live = pos >= 0
        assert torch.equal(k_c, k_2) and torch.equal(v_c, v_2)  # the new keys rotated as rope_kv rotates them
        assert torch.equal(k_c[3], base[0][3])  # the padding row's slot untouched
        tol = 1e-5 if dtype == torch.float32 else 2e-3
        torch.testing.assert_close(got[live].float(), two[live].float(), rtol=tol, atol=tol)
        torch.testing.assert_close(got[live].float(), want[live].float(), rtol=tol, atol=2 * tol)


def _tandem(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "services.cli", *args], capture_output=True, text=True, timeout=300)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the answer of a machine without CUDA")
def test_roofline_without_cuda_is_a_clear_error() -> None:
    res = _tandem("bench", "engine", "--device", "cuda", "--roofline")
    assert res.returncode == 2, res.stderr
    assert "needs a CUDA GPU" in res.stderr and "Traceback" not in res.stderr


@pytest.mark.parametrize("args, words", [(["--batches", "1,x"], "--batches"), (["--device", "cpu"], "--device")])
def test_roofline_rejects_bad_input_before_touching_a_model(args: list[str], words: str) -> None:
    res = _tandem("bench", "engine", "--roofline", *args)
    assert res.returncode == 2 and words in res.stderr and "Traceback" not in res.stderr, res.stderr
