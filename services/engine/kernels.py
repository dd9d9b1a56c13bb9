"""Triton kernels of the CUDA decode step: RMSNorm (with the residual add), RoPE + KV-cache write, SiLU*up,
split-K decode attention that reads only each slot's live KV; and the MLP down projection as split-K partials.

A row whose position is negative is padding (a batch-size bucket larger than the live batch): kernels skip
its KV write and its attention. Numerics follow the eager modules: float32 inside, one rounding to the
storage dtype where the eager code rounds.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl


@triton.jit
def _add_rmsnorm_kernel(x_ptr, a_ptr, sum_ptr, out_ptr, w_ptr, N, eps, A_PARTS: tl.constexpr, BLOCK: tl.constexpr):
    """x + a (a given as A_PARTS partial sums [A_PARTS, R, N], 0 for none) and RMSNorm of it, per row."""
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    m = cols < N
    x = tl.load(x_ptr + row * N + cols, mask=m, other=0.0)
    if A_PARTS > 0:
        a = tl.zeros([BLOCK], tl.float32)
        for p in tl.static_range(A_PARTS):
            a += tl.load(a_ptr + (p * tl.num_programs(0) + row) * N + cols, mask=m, other=0.0).to(tl.float32)
        x = (x.to(tl.float32) + a).to(x.dtype)
        tl.store(sum_ptr + row * N + cols, x, mask=m)
    h = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(h * h, 0) / N + eps)
    w = tl.load(w_ptr + cols, mask=m, other=0.0)
    y = (h * rstd).to(x.dtype).to(tl.float32) * w.to(tl.float32)
    tl.store(out_ptr + row * N + cols, y.to(out_ptr.dtype.element_ty), mask=m)


def rmsnorm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of contiguous rows x [R, N]."""
    out = torch.empty_like(x)
    _add_rmsnorm_kernel[(x.shape[0],)](x, x, x, out, w, x.shape[1], eps, A_PARTS=0,
                                       BLOCK=triton.next_power_of_2(x.shape[1]))
    return out


def add_rmsnorm(x: torch.Tensor, a: torch.Tensor, w: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + a, RMSNorm(x + a)) in one pass; a is [R, N] or split-K partials [P, R, N] summed here.
    The sum is rounded to x's dtype before the norm, as the eager residual is."""
    s, out = torch.empty_like(x), torch.empty_like(x)
    parts = a.shape[0] if a.dim() == 3 else 1
    _add_rmsnorm_kernel[(x.shape[0],)](x, a.contiguous(), s, out, w, x.shape[1], eps, A_PARTS=parts,
                                       BLOCK=triton.next_power_of_2(x.shape[1]))
    return s, out


def splitk_linear(x: torch.Tensor, w: torch.Tensor, parts: int = 8) -> torch.Tensor:
    """x @ w.T as `parts` float32 partial products [parts, R, N] over slices of K, for add_rmsnorm to sum:
    more thread blocks than cuBLAS gives a long-K, short-N projection (the MLP's down), and no reduce kernel."""
    m, k = x.shape
    if k % parts:
        return F.linear(x, w)[None]
    xs = x.view(m, parts, k // parts).transpose(0, 1)
    ws = w.view(w.shape[0], parts, k // parts).permute(1, 2, 0)
    if x.dtype == torch.float32:
        return torch.bmm(xs, ws)
    return torch.bmm(xs, ws, out_dtype=torch.float32)


@triton.jit
def _silu_mul_kernel(gu_ptr, out_ptr, HID, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = cols < HID
    g = tl.load(gu_ptr + row * 2 * HID + cols, mask=m, other=0.0)
    u = tl.load(gu_ptr + row * 2 * HID + HID + cols, mask=m, other=0.0)
    gf = g.to(tl.float32)
    silu = (gf / (1.0 + tl.exp(-gf))).to(g.dtype)
    tl.store(out_ptr + row * HID + cols, (silu.to(tl.float32) * u.to(tl.float32)).to(g.dtype), mask=m)


def silu_mul(gu: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for the fused projection gu = [gate | up] of shape [R, 2 * hidden]."""
    rows, hid = gu.shape[0], gu.shape[1] // 2
    out = gu.new_empty(rows, hid)
    block = 1024
    _silu_mul_kernel[(rows, triton.cdiv(hid, block))](gu, out, hid, BLOCK=block)
    return out


@triton.jit
def _rope_kv_kernel(qkv_ptr, pos_ptr, slot_ptr, cos_ptr, sin_ptr, q_ptr, k_ptr, v_ptr,
                    stride_ks, stride_kc, stride_kh,
                    H: tl.constexpr, HKV: tl.constexpr, HALF: tl.constexpr):
    row = tl.program_id(0)
    head = tl.program_id(1)
    pos = tl.load(pos_ptr + row)
    slot = tl.load(slot_ptr + row)
    live = pos >= 0
    p = tl.maximum(pos, 0)
    i = tl.arange(0, HALF)
    base = qkv_ptr + row * (H + 2 * HKV) * 2 * HALF + head * 2 * HALF
    x1 = tl.load(base + i)
    x2 = tl.load(base + HALF + i)
    if head < H + HKV:  # q and k heads rotate; v heads pass through
        c = tl.load(cos_ptr + p * HALF + i)
        s = tl.load(sin_ptr + p * HALF + i)
        f1, f2 = x1.to(tl.float32), x2.to(tl.float32)
        x1, x2 = (f1 * c - f2 * s).to(x1.dtype), (f2 * c + f1 * s).to(x2.dtype)
    if head < H:
        dst = q_ptr + (row * H + head) * 2 * HALF
        tl.store(dst + i, x1)
        tl.store(dst + HALF + i, x2)
    else:
        hk = head - H
        cache = k_ptr
        if hk >= HKV:
            hk -= HKV
            cache = v_ptr
        dst = cache + slot * stride_ks + p * stride_kc + hk * stride_kh
        tl.store(dst + i, x1, mask=live & (i >= 0))
        tl.store(dst + HALF + i, x2, mask=live & (i >= 0))


def rope_kv(qkv: torch.Tensor, pos: torch.Tensor, slot: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
            k_cache: torch.Tensor, v_cache: torch.Tensor, n_heads: int, n_kv: int) -> torch.Tensor:
    """Rotate q and k of qkv [R, (H + 2 Hkv) * D] at positions `pos` [R]; write k, v into the caches
    [S, C, Hkv, D] at (slot[r], pos[r]); return q [R, H, D]. Rows with pos < 0 write nothing."""
    rows, hd = qkv.shape[0], k_cache.shape[-1]
    q = qkv.new_empty(rows, n_heads, hd)
    assert k_cache.stride() == v_cache.stride() and k_cache.stride(-1) == 1
    _rope_kv_kernel[(rows, n_heads + 2 * n_kv)](qkv, pos, slot, cos, sin, q, k_cache, v_cache,
                                                k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
                                                H=n_heads, HKV=n_kv, HALF=hd // 2)
    return q


@triton.jit
def _decode_attn_kernel(q_ptr, k_ptr, v_ptr, pos_ptr, o_ptr, po_ptr, pml_ptr,
                        stride_ks, stride_kc, stride_kh, qk_scale,
                        H: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr,
                        BLOCK_N: tl.constexpr, NSPLIT: tl.constexpr, IEEE: tl.constexpr):
    b = tl.program_id(0)
    hk = tl.program_id(1)
    sp = tl.program_id(2)
    n = tl.load(pos_ptr + b) + 1  # live keys, the token written this step included; 0 for padding rows
    n = tl.maximum(n, 0)
    chunk = tl.cdiv(tl.cdiv(n, NSPLIT), BLOCK_N) * BLOCK_N
    lo = sp * chunk
    hi = tl.minimum(lo + chunk, n)
    g = tl.arange(0, GP)
    d = tl.arange(0, D)
    gm = g < G
    heads = hk * G + g
    q = tl.load(q_ptr + (b * H + heads)[:, None] * D + d[None, :], mask=gm[:, None], other=0.0)
    m_i = tl.full([GP], float("-inf"), tl.float32)
    l_i = tl.zeros([GP], tl.float32)
    acc = tl.zeros([GP, D], tl.float32)
    kbase = k_ptr + b * stride_ks + hk * stride_kh
    vbase = v_ptr + b * stride_ks + hk * stride_kh
    for start in range(lo, hi, BLOCK_N):
        offs = start + tl.arange(0, BLOCK_N)
        km = offs < hi
        k = tl.load(kbase + offs[:, None] * stride_kc + d[None, :], mask=km[:, None], other=0.0)
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = tl.where(km[None, :], s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(vbase + offs[:, None] * stride_kc + d[None, :], mask=km[:, None], other=0.0)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    if NSPLIT == 1:
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(o_ptr + (b * H + heads)[:, None] * D + d[None, :], out.to(o_ptr.dtype.element_ty), mask=gm[:, None])
    else:
        part = (b * H + heads) * NSPLIT + sp
        tl.store(po_ptr + part[:, None] * D + d[None, :], acc, mask=gm[:, None])
        tl.store(pml_ptr + part * 2, m_i, mask=gm)
        tl.store(pml_ptr + part * 2 + 1, l_i, mask=gm)


@triton.jit
def _decode_reduce_kernel(po_ptr, pml_ptr, o_ptr, D: tl.constexpr, NSPLIT: tl.constexpr):
    bh = tl.program_id(0)
    sp = tl.arange(0, NSPLIT)
    d = tl.arange(0, D)
    m = tl.load(pml_ptr + (bh * NSPLIT + sp) * 2)
    ls = tl.load(pml_ptr + (bh * NSPLIT + sp) * 2 + 1)
    m_max = tl.max(m, 0)
    w = tl.where(ls > 0, tl.exp2(m - m_max), 0.0)
    den = tl.sum(ls * w, 0)
    acc = tl.load(po_ptr + (bh * NSPLIT + sp)[:, None] * D + d[None, :])
    out = tl.sum(acc * w[:, None], 0) / tl.where(den > 0, den, 1.0)
    tl.store(o_ptr + bh * D + d, out.to(o_ptr.dtype.element_ty))


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pos: torch.Tensor,
                     splits: int, block_n: int = 64, num_warps: int = 4, num_stages: int = 2) -> torch.Tensor:
    """Attention of q [R, H, D] (row r = slot r) over keys 0..pos[r] of the caches [S, C, Hkv, D]; out [R, H * D].

    Grouped-query heads share one program, so each live K/V element is read once per step."""
    rows, n_heads, hd = q.shape
    n_kv = k_cache.shape[2]
    g = n_heads // n_kv
    out = q.new_empty(rows, n_heads * hd)
    if splits > 1:
        po = torch.empty(rows * n_heads * splits * hd, device=q.device, dtype=torch.float32)
        pml = torch.empty(rows * n_heads * splits * 2, device=q.device, dtype=torch.float32)
    else:
        po = pml = out
    scale = hd ** -0.5 * 1.4426950408889634  # log2(e): the kernel uses exp2
    _decode_attn_kernel[(rows, n_kv, splits)](q, k_cache, v_cache, pos, out, po, pml,
                                              k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), scale,
                                              H=n_heads, G=g, GP=max(16, triton.next_power_of_2(g)), D=hd,
                                              BLOCK_N=block_n, NSPLIT=splits, IEEE=q.dtype == torch.float32,
                                              num_warps=num_warps, num_stages=num_stages)
    if splits > 1:
        _decode_reduce_kernel[(rows * n_heads,)](po, pml, out, D=hd, NSPLIT=splits)
    return out
