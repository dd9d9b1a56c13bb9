"""Triton kernels of the CUDA decode step: RMSNorm (with the residual add), RoPE + KV-cache write, SiLU*up,
split-K decode attention that reads only each slot's live KV; the MLP down projection as split-K partials; and
`skinny_linear`, a projection for batches of at most 64 rows that streams the weight matrix once for all rows
(split-K float32 partials that the next kernel sums, or SiLU(gate) * up in its epilogue).

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
def _pdl_trigger():
    """Programmatic dependent launch: the next kernel may be launched now (it waits in its own _pdl_enter)."""
    tl.inline_asm_elementwise("griddepcontrol.launch_dependents; // $0", "=r", [], dtype=tl.int32, is_pure=False,
                              pack=1)


@triton.jit
def _pdl_enter(TRIGGER: tl.constexpr = True):
    """Programmatic dependent launch (Hopper): let the next kernel be launched now (TRIGGER; else the kernel
    calls _pdl_trigger later), then wait until the previous kernel has finished and its writes are visible. A
    kernel launched with launch_pdl must call this before it reads or writes anything another kernel touches."""
    if TRIGGER:
        _pdl_trigger()
    tl.inline_asm_elementwise("griddepcontrol.wait; // $0", "=r", [], dtype=tl.int32, is_pure=False, pack=1)


# pdl=2 (fused.PDL_LATE) at a launch: the projection and attention kernels call _pdl_trigger after their main
# loop instead of at their start (their constexpr PDL is 2); the other kernels trigger at their start as with True.
def _pdl(pdl: bool | int) -> dict:
    return {"launch_pdl": True} if pdl else {}


@triton.jit
def _add_rmsnorm_kernel(x_ptr, a_ptr, sum_ptr, out_ptr, w_ptr, N, eps, A_PARTS: tl.constexpr, BLOCK: tl.constexpr,
                        PDL: tl.constexpr = False):
    """x + a (a given as A_PARTS partial sums [A_PARTS, R, N], 0 for none) and RMSNorm of it, per row."""
    if PDL:
        _pdl_enter()
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


def rmsnorm(x: torch.Tensor, w: torch.Tensor, eps: float, pdl: bool = False) -> torch.Tensor:
    """RMSNorm of contiguous rows x [R, N]."""
    out = torch.empty_like(x)
    _add_rmsnorm_kernel[(x.shape[0],)](x, x, x, out, w, x.shape[1], eps, A_PARTS=0,
                                       BLOCK=triton.next_power_of_2(x.shape[1]), PDL=pdl, **_pdl(pdl))
    return out


def add_rmsnorm(x: torch.Tensor, a: torch.Tensor, w: torch.Tensor, eps: float,
                pdl: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + a, RMSNorm(x + a)) in one pass; a is [R, N] or split-K partials [P, R, N] summed here.
    The sum is rounded to x's dtype before the norm, as the eager residual is."""
    s, out = torch.empty_like(x), torch.empty_like(x)
    parts = a.shape[0] if a.dim() == 3 else 1
    _add_rmsnorm_kernel[(x.shape[0],)](x, a.contiguous(), s, out, w, x.shape[1], eps, A_PARTS=parts,
                                       BLOCK=triton.next_power_of_2(x.shape[1]), PDL=pdl, **_pdl(pdl))
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


@triton.jit(do_not_specialize=["M", "stride_op"])  # one binary for every batch size of a block size
def _skinny_kernel(x_ptr, w_ptr, out_ptr, M, N, K, K_PER, stride_xm, stride_op, stride_om,
                   BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, SILU: tl.constexpr, IEEE: tl.constexpr,
                   PDL: tl.constexpr = False):
    """out[part] = x[:, K slice `part`] @ w[BN rows, same slice].T for the M (<= BM) rows of x at once.

    Program (n, part) streams a [BN, K_PER] block of w once, whatever M: the products are [BN, BK] x [BK, BM]
    tensor-core dots (rows of x past M are masked to zero). SILU: w is [gate | up] (2N rows); the program also
    streams the up rows n + N and stores silu(gate) * up, each rounded to the output dtype where the eager
    modules round."""
    if PDL:
        _pdl_enter(PDL != 2)
    pid_n = tl.program_id(0)
    part = tl.program_id(1)
    rn = pid_n * BN + tl.arange(0, BN)
    rm = tl.arange(0, BM)
    rk = tl.arange(0, BK)
    nm = rn < N
    mm = rm < M
    k_lo = part * K_PER
    w_rows = w_ptr + rn.to(tl.int64)[:, None] * K + rk[None, :]
    x_rows = x_ptr + rm[:, None] * stride_xm + rk[None, :]
    acc = tl.zeros([BN, BM], dtype=tl.float32)
    acc_u = tl.zeros([BN, BM], dtype=tl.float32)
    for k in range(k_lo, k_lo + K_PER, BK):
        x = tl.load(x_rows + k, mask=mm[:, None], other=0.0)
        w = tl.load(w_rows + k, mask=nm[:, None], other=0.0)
        if IEEE:
            acc = tl.dot(w, tl.trans(x), acc, input_precision="ieee")
        else:
            acc = tl.dot(w, tl.trans(x), acc)
        if SILU:
            u = tl.load(w_rows + N * K + k, mask=nm[:, None], other=0.0)
            if IEEE:
                acc_u = tl.dot(u, tl.trans(x), acc_u, input_precision="ieee")
            else:
                acc_u = tl.dot(u, tl.trans(x), acc_u)
    if PDL == 2:
        _pdl_trigger()
    dt = out_ptr.dtype.element_ty
    if SILU:
        g = acc.to(dt).to(tl.float32)
        y = (g / (1.0 + tl.exp(-g))).to(dt).to(tl.float32) * acc_u.to(dt).to(tl.float32)
    else:
        y = acc
    dst = out_ptr + part * stride_op + rm[None, :] * stride_om + rn[:, None]
    tl.store(dst, y.to(dt), mask=nm[:, None] & mm[None, :])


SKINNY_MAX_ROWS = 64


def skinny_linear(x: torch.Tensor, w: torch.Tensor, *, bn: int = 64, bk: int = 128, split: int = 1,
                  partials: bool = True, silu: bool = False, out: torch.Tensor | None = None,
                  num_warps: int = 4, num_stages: int = 3, pdl: bool = False) -> torch.Tensor:
    """x [M, K] @ w.T for M <= 64 rows, w [N, K] read once for all of them.

    partials (the default): float32 split-K partial products [split, M, N], for the next kernel to sum
    (add_rmsnorm, rope_kv, silu_mul take them). partials=False (split 1): x @ w.T in x's dtype, into `out` when
    given (rows of `out` may be strided, like a logits buffer). silu=True (split 1): w is [gate | up] [2N, K] and
    the result is silu(x @ gate.T) * (x @ up.T) [M, N] in x's dtype, as silu_mul(F.linear(x, w)) rounds it."""
    m, k = x.shape
    if w.shape[1] != k or x.stride(1) != 1 or w.stride(1) != 1 or w.stride(0) != k:
        raise ValueError(f"skinny_linear needs contiguous x [M, K] and w [N, K] (got {tuple(x.shape)}, {tuple(w.shape)})")
    if not 1 <= m <= SKINNY_MAX_ROWS:
        raise ValueError(f"skinny_linear takes 1..{SKINNY_MAX_ROWS} rows (got {m})")
    if split < 1 or k % (bk * split):
        raise ValueError(f"K ({k}) must be a multiple of bk * split ({bk} * {split})")
    n = w.shape[0] // 2 if silu else w.shape[0]
    if (silu or not partials) and split != 1:
        raise ValueError("a rounded (not partial) product takes split 1")
    if silu or not partials:
        y = out if out is not None else x.new_empty(m, n)
        if y.shape != (m, n) or y.stride(1) != 1 or y.dtype != x.dtype:
            raise ValueError(f"out must be [{m}, {n}] in {x.dtype} with contiguous rows")
        stride_op, stride_om = 0, y.stride(0)
    else:
        y = torch.empty(split, m, n, device=x.device, dtype=torch.float32)
        stride_op, stride_om = m * n, n
    _skinny_kernel[(triton.cdiv(n, bn), split)](x, w, y, m, n, k, k // split, x.stride(0), stride_op, stride_om,
                                                BM=max(16, triton.next_power_of_2(m)), BN=bn, BK=bk, SILU=silu,
                                                IEEE=x.dtype == torch.float32, PDL=pdl, num_warps=num_warps,
                                                num_stages=num_stages, **_pdl(pdl))
    return y


@triton.jit
def _silu_mul_kernel(gu_ptr, out_ptr, HID, PSTRIDE, PARTS: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr = False):
    """silu(gate) * up of one row of gu = [gate | up]; PARTS > 0: gu is float32 split-K partials summed here."""
    if PDL:
        _pdl_enter()
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = cols < HID
    dt = out_ptr.dtype.element_ty
    if PARTS == 0:
        g = tl.load(gu_ptr + row * 2 * HID + cols, mask=m, other=0.0).to(dt)
        u = tl.load(gu_ptr + row * 2 * HID + HID + cols, mask=m, other=0.0).to(dt)
    else:
        ga = tl.zeros([BLOCK], tl.float32)
        ua = tl.zeros([BLOCK], tl.float32)
        for p in tl.static_range(PARTS):
            ga += tl.load(gu_ptr + p * PSTRIDE + row * 2 * HID + cols, mask=m, other=0.0)
            ua += tl.load(gu_ptr + p * PSTRIDE + row * 2 * HID + HID + cols, mask=m, other=0.0)
        g, u = ga.to(dt), ua.to(dt)
    gf = g.to(tl.float32)
    silu = (gf / (1.0 + tl.exp(-gf))).to(dt)
    tl.store(out_ptr + row * HID + cols, (silu.to(tl.float32) * u.to(tl.float32)).to(dt), mask=m)


def silu_mul(gu: torch.Tensor, dtype: torch.dtype | None = None, pdl: bool = False) -> torch.Tensor:
    """silu(gate) * up for the fused projection gu = [gate | up] of shape [R, 2 * hidden], or for its float32
    split-K partials [P, R, 2 * hidden] (summed and rounded to `dtype` first, as the eager product is rounded)."""
    parts = gu.shape[0] if gu.dim() == 3 else 0
    rows, hid = gu.shape[-2], gu.shape[-1] // 2
    out = torch.empty(rows, hid, device=gu.device, dtype=dtype or gu.dtype)
    block = 1024
    _silu_mul_kernel[(rows, triton.cdiv(hid, block))](gu.contiguous(), out, hid, rows * 2 * hid, PARTS=parts,
                                                      BLOCK=block, PDL=pdl, **_pdl(pdl))
    return out


@triton.jit
def _rope_kv_kernel(qkv_ptr, pos_ptr, slot_ptr, cos_ptr, sin_ptr, q_ptr, k_ptr, v_ptr,
                    stride_ks, stride_kc, stride_kh, PSTRIDE,
                    H: tl.constexpr, HKV: tl.constexpr, HALF: tl.constexpr, PARTS: tl.constexpr,
                    PDL: tl.constexpr = False):
    if PDL:
        _pdl_enter()
    row = tl.program_id(0)
    head = tl.program_id(1)
    pos = tl.load(pos_ptr + row)
    slot = tl.load(slot_ptr + row)
    p = tl.maximum(pos, 0)
    i = tl.arange(0, HALF)
    live = (i * 0 + pos) >= 0  # a block mask: some interpreters refuse a scalar one
    base = qkv_ptr + row * (H + 2 * HKV) * 2 * HALF + head * 2 * HALF
    if PARTS == 0:
        x1 = tl.load(base + i).to(q_ptr.dtype.element_ty)
        x2 = tl.load(base + HALF + i).to(q_ptr.dtype.element_ty)
    else:  # float32 split-K partials of the projection, summed and rounded as the eager product is
        a1 = tl.zeros([HALF], tl.float32)
        a2 = tl.zeros([HALF], tl.float32)
        for pp in tl.static_range(PARTS):
            a1 += tl.load(base + pp * PSTRIDE + i)
            a2 += tl.load(base + pp * PSTRIDE + HALF + i)
        x1, x2 = a1.to(q_ptr.dtype.element_ty), a2.to(q_ptr.dtype.element_ty)
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
        tl.store(dst + i, x1, mask=live)
        tl.store(dst + HALF + i, x2, mask=live)


def rope_kv(qkv: torch.Tensor, pos: torch.Tensor, slot: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
            k_cache: torch.Tensor, v_cache: torch.Tensor, n_heads: int, n_kv: int, pdl: bool = False) -> torch.Tensor:
    """Rotate q and k of qkv [R, (H + 2 Hkv) * D] (or its float32 split-K partials [P, R, (H + 2 Hkv) * D]) at
    positions `pos` [R]; write k, v into the caches [S, C, Hkv, D] at (slot[r], pos[r]); return q [R, H, D] in the
    caches' dtype. Rows with pos < 0 write nothing."""
    parts = qkv.shape[0] if qkv.dim() == 3 else 0
    rows, hd = qkv.shape[-2], k_cache.shape[-1]
    q = torch.empty(rows, n_heads, hd, device=qkv.device, dtype=k_cache.dtype)
    assert k_cache.stride() == v_cache.stride() and k_cache.stride(-1) == 1
    qkv = qkv.contiguous()
    _rope_kv_kernel[(rows, n_heads + 2 * n_kv)](qkv, pos, slot, cos, sin, q, k_cache, v_cache,
                                                k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
                                                rows * qkv.shape[-1], H=n_heads, HKV=n_kv, HALF=hd // 2, PARTS=parts,
                                                PDL=pdl, **_pdl(pdl))
    return q


@triton.jit
def _attn_program(NKV: tl.constexpr, NSPLIT: tl.constexpr, HK_FAST: tl.constexpr):
    """(row b, KV head hk, key split sp) of this attention program. HK_FAST (a 1-D grid): the KV heads of one row
    and key range are consecutive programs, so programs running together read neighbouring cache bytes (a
    cache row [Hkv, D] is contiguous); else the grid is (rows, Hkv, splits)."""
    if HK_FAST:
        pid = tl.program_id(0)
        hk = pid % NKV
        sp = (pid // NKV) % NSPLIT
        b = pid // (NKV * NSPLIT)
    else:
        b = tl.program_id(0)
        hk = tl.program_id(1)
        sp = tl.program_id(2)
    return b, hk, sp


@triton.jit
def _key_range(pos, sp, NSPLIT: tl.constexpr, BLOCK_N: tl.constexpr):
    """Keys [lo, hi) of split sp for a row whose new token sits at pos: pos + 1 live keys (the token of this step
    included; none for a padding row, pos < 0) cut into NSPLIT chunks of whole BLOCK_N blocks."""
    n = tl.maximum(pos + 1, 0)
    chunk = tl.cdiv(tl.cdiv(n, NSPLIT), BLOCK_N) * BLOCK_N
    lo = sp * chunk
    return lo, tl.minimum(lo + chunk, n)


@triton.jit
def _attend(q, kbase, vbase, lo, hi, stride_kc, qk_scale, o_ptr, po_ptr, pml_ptr, bh, gm, sp, GP: tl.constexpr,
            D: tl.constexpr, BLOCK_N: tl.constexpr, NSPLIT: tl.constexpr, IEEE: tl.constexpr,
            LATE: tl.constexpr = False):
    """Online-softmax attention of the GP query rows q [GP, D] over keys lo..hi-1 at kbase/vbase (rows stride_kc
    apart); the output of rows bh (b * H + head; gm masks padded heads) to o_ptr, or with NSPLIT > 1 this split's
    float32 partials (acc, max, sum) to po_ptr / pml_ptr for the reduce."""
    d = tl.arange(0, D)
    m_i = tl.full([GP], float("-inf"), tl.float32)
    l_i = tl.zeros([GP], tl.float32)
    acc = tl.zeros([GP, D], tl.float32)
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
    if LATE:
        _pdl_trigger()
    if NSPLIT == 1:
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(o_ptr + bh[:, None] * D + d[None, :], out.to(o_ptr.dtype.element_ty), mask=gm[:, None])
    else:
        part = bh * NSPLIT + sp
        tl.store(po_ptr + part[:, None] * D + d[None, :], acc, mask=gm[:, None])
        tl.store(pml_ptr + part * 2, m_i, mask=gm)
        tl.store(pml_ptr + part * 2 + 1, l_i, mask=gm)


@triton.jit
def _decode_attn_kernel(q_ptr, k_ptr, v_ptr, pos_ptr, o_ptr, po_ptr, pml_ptr,
                        stride_ks, stride_kc, stride_kh, qk_scale,
                        H: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr,
                        BLOCK_N: tl.constexpr, NSPLIT: tl.constexpr, IEEE: tl.constexpr, PDL: tl.constexpr = False,
                        HK_FAST: tl.constexpr = True):
    if PDL:
        _pdl_enter(PDL != 2)
    b, hk, sp = _attn_program(H // G, NSPLIT, HK_FAST)
    lo, hi = _key_range(tl.load(pos_ptr + b), sp, NSPLIT, BLOCK_N)
    g = tl.arange(0, GP)
    d = tl.arange(0, D)
    gm = g < G
    heads = hk * G + g
    q = tl.load(q_ptr + (b * H + heads)[:, None] * D + d[None, :], mask=gm[:, None], other=0.0)
    _attend(q, k_ptr + b * stride_ks + hk * stride_kh, v_ptr + b * stride_ks + hk * stride_kh, lo, hi, stride_kc,
            qk_scale, o_ptr, po_ptr, pml_ptr, b * H + heads, gm, sp, GP, D, BLOCK_N, NSPLIT, IEEE, PDL == 2)


@triton.jit
def _sum_parts(ptr, offs, PSTRIDE, PARTS: tl.constexpr, dt: tl.constexpr):
    """Values at ptr + offs of a product in `dt`, or of its PARTS float32 split-K partials (PSTRIDE apart), summed
    and rounded to `dt` once, as the eager product is."""
    if PARTS == 0:
        val = tl.load(ptr + offs).to(dt)
    else:
        acc = tl.load(ptr + offs)
        for pp in tl.static_range(1, PARTS):
            acc += tl.load(ptr + pp * PSTRIDE + offs)
        val = acc.to(dt)
    return val


@triton.jit
def _rope_attn_kernel(qkv_ptr, pos_ptr, slot_ptr, cos_ptr, sin_ptr, k_ptr, v_ptr, o_ptr, po_ptr, pml_ptr,
                      stride_ks, stride_kc, stride_kh, qk_scale, PSTRIDE,
                      H: tl.constexpr, HKV: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, HALF: tl.constexpr,
                      BLOCK_N: tl.constexpr, NSPLIT: tl.constexpr, PARTS: tl.constexpr, IEEE: tl.constexpr,
                      PDL: tl.constexpr = False, HK_FAST: tl.constexpr = True):
    """rope_kv and decode attention in one kernel. Program (b, hk, sp) rotates the G query heads of KV head hk
    of row b itself; the program whose key range holds the new position rotates that position's key, writes it
    and its value into the caches (slot[b]), and then reads them back with the rest of its range. Scores are
    the rest is _decode_attn_kernel's."""
    if PDL:
        _pdl_enter(PDL != 2)
    b, hk, sp = _attn_program(HKV, NSPLIT, HK_FAST)
    dt = k_ptr.dtype.element_ty
    pos = tl.load(pos_ptr + b)
    p = tl.maximum(pos, 0)
    lo, hi = _key_range(pos, sp, NSPLIT, BLOCK_N)
    i = tl.arange(0, HALF)
    g = tl.arange(0, GP)
    gm = g < G
    row = qkv_ptr + b * (H + 2 * HKV) * 2 * HALF
    c = tl.load(cos_ptr + p * HALF + i)
    sn = tl.load(sin_ptr + p * HALF + i)
    qh = tl.where(gm, hk * G + g, 0)[:, None] * 2 * HALF + i[None, :]  # padded heads read head 0, masked below
    q1 = _sum_parts(row, qh, PSTRIDE, PARTS, dt).to(tl.float32)
    q2 = _sum_parts(row, qh + HALF, PSTRIDE, PARTS, dt).to(tl.float32)
    q1, q2 = (q1 * c[None, :] - q2 * sn[None, :]).to(dt), (q2 * c[None, :] + q1 * sn[None, :]).to(dt)
    q = tl.reshape(tl.permute(tl.join(q1, q2), (0, 2, 1)), (GP, 2 * HALF))  # [GP, D]: the halves side by side
    kbase = k_ptr + b * stride_ks + hk * stride_kh
    vbase = v_ptr + b * stride_ks + hk * stride_kh
    if (pos >= lo) & (pos < hi):  # this program's range holds the new token: rotate and store it first
        slot = tl.load(slot_ptr + b)
        ko = (H + hk) * 2 * HALF + i
        vo = (H + HKV + hk) * 2 * HALF + i
        k1 = _sum_parts(row, ko, PSTRIDE, PARTS, dt).to(tl.float32)
        k2 = _sum_parts(row, ko + HALF, PSTRIDE, PARTS, dt).to(tl.float32)
        dst = slot * stride_ks + pos * stride_kc + hk * stride_kh
        tl.store(k_ptr + dst + i, (k1 * c - k2 * sn).to(dt))
        tl.store(k_ptr + dst + HALF + i, (k2 * c + k1 * sn).to(dt))
        tl.store(v_ptr + dst + i, _sum_parts(row, vo, PSTRIDE, PARTS, dt))
        tl.store(v_ptr + dst + HALF + i, _sum_parts(row, vo + HALF, PSTRIDE, PARTS, dt))
        tl.debug_barrier()  # the block's loads below see the stores
    _attend(q, kbase, vbase, lo, hi, stride_kc, qk_scale, o_ptr, po_ptr, pml_ptr, b * H + hk * G + g, gm, sp, GP,
            2 * HALF, BLOCK_N, NSPLIT, IEEE, PDL == 2)


@triton.jit
def _decode_reduce_kernel(po_ptr, pml_ptr, o_ptr, D: tl.constexpr, NSPLIT: tl.constexpr, PDL: tl.constexpr = False):
    if PDL:
        _pdl_enter()
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
                     splits: int, block_n: int = 64, num_warps: int = 4, num_stages: int = 2,
                     pdl: bool = False, hk_fast: bool = True) -> torch.Tensor:
    """Attention of q [R, H, D] (row r = slot r) over keys 0..pos[r] of the caches [S, C, Hkv, D]; out [R, H * D].

    Grouped-query heads share one program, so each live K/V element is read once per step."""
    rows, n_heads, hd = q.shape
    n_kv = k_cache.shape[2]
    g = n_heads // n_kv
    out, po, pml = _attn_outputs(rows, n_heads, hd, splits, q.device, q.dtype)
    _decode_attn_kernel[_attn_grid(rows, n_kv, splits, hk_fast)](q, k_cache, v_cache, pos, out, po, pml,
                                              k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
                                              _qk_scale(hd), H=n_heads, G=g, GP=max(16, triton.next_power_of_2(g)),
                                              D=hd, BLOCK_N=block_n, NSPLIT=splits, IEEE=q.dtype == torch.float32,
                                              PDL=pdl, HK_FAST=hk_fast, num_warps=num_warps, num_stages=num_stages,
                                              **_pdl(pdl))
    return _reduce_splits(out, po, pml, rows * n_heads, hd, splits, pdl)


def _attn_grid(rows: int, n_kv: int, splits: int, hk_fast: bool) -> tuple[int, ...]:
    return (rows * n_kv * splits,) if hk_fast else (rows, n_kv, splits)


def _qk_scale(hd: int) -> float:
    return hd ** -0.5 * 1.4426950408889634  # log2(e): the kernels use exp2


def _attn_outputs(rows: int, n_heads: int, hd: int, splits: int, device: torch.device,
                  dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The attention output [R, H * D] and, with key splits, the float32 partials (acc, then max and sum) that the
    reduce combines (without: the output stands in for them, unused)."""
    out = torch.empty(rows, n_heads * hd, device=device, dtype=dtype)
    if splits == 1:
        return out, out, out
    return (out, torch.empty(rows * n_heads * splits * hd, device=device, dtype=torch.float32),
            torch.empty(rows * n_heads * splits * 2, device=device, dtype=torch.float32))


def _reduce_splits(out: torch.Tensor, po: torch.Tensor, pml: torch.Tensor, heads: int, hd: int, splits: int,
                   pdl: bool) -> torch.Tensor:
    if splits > 1:
        _decode_reduce_kernel[(heads,)](po, pml, out, D=hd, NSPLIT=splits, PDL=pdl, **_pdl(pdl))
    return out


def rope_attention(qkv: torch.Tensor, pos: torch.Tensor, slot: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   k_cache: torch.Tensor, v_cache: torch.Tensor, n_heads: int, n_kv: int, splits: int,
                   block_n: int = 64, num_warps: int = 4, num_stages: int = 2, pdl: bool = False,
                   hk_fast: bool = True) -> torch.Tensor:
    """decode_attention(rope_kv(qkv, ...), ...) with one kernel fewer: q and the new k rotated inside the attention
    kernel, the new k and v written to the caches at (slot[r], pos[r]) there. Attention of row r reads slot r, as
    decode_attention's does (the dense decode batch: slot[r] = r). qkv [R, (H + 2 Hkv) * D] or its float32 split-K
    partials [P, R, (H + 2 Hkv) * D]; out [R, H * D] in the caches' dtype."""
    parts = qkv.shape[0] if qkv.dim() == 3 else 0
    rows, hd = qkv.shape[-2], k_cache.shape[-1]
    assert k_cache.stride() == v_cache.stride() and k_cache.stride(-1) == 1
    qkv = qkv.contiguous()
    g = n_heads // n_kv
    out, po, pml = _attn_outputs(rows, n_heads, hd, splits, qkv.device, k_cache.dtype)
    _rope_attn_kernel[_attn_grid(rows, n_kv, splits, hk_fast)](qkv, pos, slot, cos, sin, k_cache, v_cache, out, po, pml,
                                            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), _qk_scale(hd),
                                            rows * qkv.shape[-1], H=n_heads, HKV=n_kv, G=g,
                                            GP=max(16, triton.next_power_of_2(g)), HALF=hd // 2, BLOCK_N=block_n,
                                            NSPLIT=splits, PARTS=parts, IEEE=k_cache.dtype == torch.float32,
                                            PDL=pdl, HK_FAST=hk_fast, num_warps=num_warps, num_stages=num_stages,
                                            **_pdl(pdl))
    return _reduce_splits(out, po, pml, rows * n_heads, hd, splits, pdl)
