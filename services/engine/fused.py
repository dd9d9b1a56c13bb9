"""The decode step as a few large kernels: QKV and gate/up fused at load time, written once against an ops table.

`fuse_weights` concatenates each layer's q/k/v and gate/up matrices and re-points the module parameters at
row slices of the fused matrix, so no memory is added, checkpoints still load by their Hugging Face names
and the eager path computes exactly what it did. `decode_step` runs one token per row with either
`TORCH_OPS` (plain PyTorch, any device: the reference) or the Triton kernels (`triton_ops()`, CUDA; the
projections there are chosen per batch bucket by services.engine.gemv).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from services.engine.layers import apply_rope
from services.engine.model import Transformer


@dataclass(slots=True)
class FusedLayer:
    in_norm: torch.Tensor
    wqkv: torch.Tensor  # [(H + 2 Hkv) * D, dim]: rows q | k | v
    bqkv: torch.Tensor | None
    wo: torch.Tensor
    post_norm: torch.Tensor
    wgu: torch.Tensor  # [2 * hidden, dim]: rows gate | up
    wdown: torch.Tensor


@dataclass(slots=True)
class FusedModel:
    embed: torch.Tensor
    layers: list[FusedLayer]
    norm: torch.Tensor
    lm_head: torch.Tensor
    eps: float
    n_heads: int
    n_kv: int
    cos: torch.Tensor  # [max_seq_len, head_dim / 2] float32, rows indexed by position
    sin: torch.Tensor


def _fused(owner: nn.Module, name: str, mods: list[nn.Linear], attr: str) -> torch.Tensor | None:
    """The concatenation of `attr` of `mods`, kept on `owner` as `name`; made (and the parameters re-pointed at
    its row slices) unless the parameters already are those slices."""
    parts = [getattr(m, attr) for m in mods]
    if parts[0] is None:
        return None
    fused = getattr(owner, name, None)
    if fused is not None:
        offsets = [fused.data_ptr() + sum(q.numel() for q in parts[:i]) * fused.element_size()
                   for i in range(len(parts))]
        if [p.data_ptr() for p in parts] == offsets and fused.shape[0] == sum(p.shape[0] for p in parts):
            return fused
    fused = torch.cat([p.detach() for p in parts])
    start = 0
    for m, p in zip(mods, parts, strict=True):
        setattr(m, attr, nn.Parameter(fused[start:start + p.shape[0]], requires_grad=p.requires_grad))
        start += p.shape[0]
    object.__setattr__(owner, name, fused)  # a plain attribute: not a parameter, not in the state_dict
    return fused


@torch.no_grad()
def fuse_weights(model: Transformer) -> FusedModel:
    """Fuse QKV and gate/up of every layer (idempotent) and return the step's view of the weights."""
    cfg = model.cfg
    layers = []
    for blk in model.layers:
        a, mlp = blk.self_attn, blk.mlp
        qkv = [a.q_proj, a.k_proj, a.v_proj]
        wqkv, bqkv = _fused(a, "_wqkv", qkv, "weight"), _fused(a, "_bqkv", qkv, "bias")
        wgu = _fused(mlp, "_wgu", [mlp.gate_proj, mlp.up_proj], "weight")
        layers.append(FusedLayer(blk.input_layernorm.weight.detach(), wqkv, bqkv, a.o_proj.weight.detach(),
                                 blk.post_attention_layernorm.weight.detach(), wgu, mlp.down_proj.weight.detach()))
    cos, sin = rope_tables(model.inv_freq, cfg.max_seq_len)
    return FusedModel(model.embed_tokens.weight.detach(), layers, model.norm.weight.detach(),
                      model.lm_head.weight.detach(), cfg.norm_eps, cfg.n_heads, cfg.n_kv_heads, cos, sin)


def rope_tables(inv_freq: torch.Tensor, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [max_len, D/2] in float32, computed as layers.rope_cos_sin computes them (same angles, same device)."""
    angles = torch.arange(max_len, device=inv_freq.device).to(torch.float32)[:, None] * inv_freq
    return angles.cos().contiguous(), angles.sin().contiguous()


# ---- the reference ops (plain PyTorch); the Triton kernels in services.engine.kernels share these signatures ----

def _rmsnorm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    h = x.float()
    return w * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _add_rmsnorm(x: torch.Tensor, a: torch.Tensor, w: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """a: [R, N], or split-K partials [P, R, N] (summed, then added to x with one rounding)."""
    s = (x + (a.sum(0) if a.dim() == 3 else a)).to(x.dtype)
    return s, _rmsnorm(s, w, eps)


def _silu_mul(gu: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """gu [R, 2 hidden], or split-K partials [P, R, 2 hidden] summed and rounded to `dtype` first."""
    if gu.dim() == 3:
        gu = gu.sum(0).to(dtype or gu.dtype)
    g, u = gu.chunk(2, dim=-1)
    return F.silu(g) * u


def _rope_kv(qkv: torch.Tensor, pos: torch.Tensor, slot: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
             k_cache: torch.Tensor, v_cache: torch.Tensor, n_heads: int, n_kv: int) -> torch.Tensor:
    if qkv.dim() == 3:  # split-K partials: summed and rounded once, as the eager product is
        qkv = qkv.sum(0).to(k_cache.dtype)
    rows, hd = qkv.shape[0], k_cache.shape[-1]
    q, k, v = qkv.view(rows, 1, n_heads + 2 * n_kv, hd).split([n_heads, n_kv, n_kv], dim=2)
    p = pos.clamp(min=0)
    c, s = (torch.cat((t[p], t[p]), dim=-1).to(qkv.dtype)[:, None] for t in (cos, sin))  # [R, 1, D]
    q, k = apply_rope(q, c, s), apply_rope(k, c, s)
    live = pos >= 0
    k_cache[slot[live], pos[live]] = k[live, 0]
    v_cache[slot[live], pos[live]] = v[live, 0]
    return q[:, 0]


def _attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pos: torch.Tensor,
               splits: int) -> torch.Tensor:
    del splits  # one SDPA call; splitting the keys is the kernel's business
    rows, n_heads, hd = q.shape
    kv_len = int(pos.max()) + 1
    keys = k_cache[:rows, :kv_len].transpose(1, 2)
    vals = v_cache[:rows, :kv_len].transpose(1, 2)
    mask = (torch.arange(kv_len, device=q.device)[None, :] <= pos[:, None])[:, None, None]  # [R, 1, 1, L]
    out = F.scaled_dot_product_attention(q[:, :, None], keys, vals, attn_mask=mask,
                                         enable_gqa=k_cache.shape[2] != n_heads)
    return out.reshape(rows, n_heads * hd)


def _rope_attention(qkv: torch.Tensor, pos: torch.Tensor, slot: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                    k_cache: torch.Tensor, v_cache: torch.Tensor, n_heads: int, n_kv: int, splits: int) -> torch.Tensor:
    return _attention(_rope_kv(qkv, pos, slot, cos, sin, k_cache, v_cache, n_heads, n_kv), k_cache, v_cache, pos,
                      splits)


def _qkv(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    return F.linear(h, w, b)


def _o(o: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return F.linear(o, w)


def _down(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return F.linear(x, w)[None]  # one "partial": the Triton ops split K here (kernels.splitk_linear)


def _mlp_in(h: torch.Tensor, wgu: torch.Tensor) -> torch.Tensor:
    return _silu_mul(F.linear(h, wgu))


def _head(h: torch.Tensor, w: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    return F.linear(h, w) if out is None else torch.mm(h, w.t(), out=out)


# Projections: qkv (-> rope_attention), o (-> add_rmsnorm), mlp_in (h -> silu(gate) * up), down (-> add_rmsnorm),
# head. What a projection returns is what its consumer takes: a product [R, N] or float32 split-K partials [P, R, N].
# rope_attention = attention(rope_kv(...)): the step calls it; the Triton table does both in one kernel.
TORCH_OPS = SimpleNamespace(rmsnorm=_rmsnorm, add_rmsnorm=_add_rmsnorm, silu_mul=_silu_mul, rope_kv=_rope_kv,
                            attention=_attention, rope_attention=_rope_attention, qkv=_qkv, o=_o, mlp_in=_mlp_in,
                            down=_down, head=_head)


PDL_LATE = 2  # triton_ops(pdl=PDL_LATE): kernels.py's late trigger of programmatic dependent launch


def triton_ops(pdl: bool | int = False, fuse_rope: bool = True) -> SimpleNamespace:
    """The Triton kernels, projections through cuBLAS (services.engine.gemv picks others per batch bucket).
    pdl: launch every Triton kernel with programmatic dependent launch (Hopper; each kernel waits for its
    predecessor inside, so the next launch overlaps the running kernel); PDL_LATE: the projection and attention
    kernels let the next one launch only after their main loop, not at their start. fuse_rope: rope_attention is
    one kernel (kernels.rope_attention), else rope_kv then decode_attention (the step before that kernel)."""
    from functools import partial

    from services.engine import kernels

    k = {name: partial(getattr(kernels, fn), pdl=pdl) if pdl else getattr(kernels, fn) for name, fn in
         (("rmsnorm", "rmsnorm"), ("add_rmsnorm", "add_rmsnorm"), ("silu_mul", "silu_mul"), ("rope_kv", "rope_kv"),
          ("attention", "decode_attention"), ("rope_attention", "rope_attention"))}
    if not fuse_rope:
        rope_kv, attention = k["rope_kv"], k["attention"]

        def unfused(qkv, pos, slot, cos, sin, kc, vc, n_heads, n_kv, splits, **tiles):  # noqa: ANN001, ANN202
            return attention(rope_kv(qkv, pos, slot, cos, sin, kc, vc, n_heads, n_kv), kc, vc, pos, splits, **tiles)
        k["rope_attention"] = unfused
    silu_mul = k["silu_mul"]
    return SimpleNamespace(**k, qkv=_qkv, o=_o, mlp_in=lambda h, wgu: silu_mul(F.linear(h, wgu)),
                           down=kernels.splitk_linear, head=_head, pdl=pdl)


def decode_step(fm: FusedModel, ops: SimpleNamespace, tokens: torch.Tensor, pos: torch.Tensor, slot: torch.Tensor,
                k: torch.Tensor, v: torch.Tensor, splits: int = 1, out: torch.Tensor | None = None) -> torch.Tensor:
    """One token per row: row r appends tokens[r] at position pos[r] of KV slot slot[r] (pos < 0: padding).

    Attention of row r reads slot r (the dense batch). k, v: [n_layers, S, C, Hkv, D]. Logits [R, V] in the
    weights' dtype, written into `out` when given."""
    x = F.embedding(tokens, fm.embed)
    h = ops.rmsnorm(x, fm.layers[0].in_norm, fm.eps)
    for i, lw in enumerate(fm.layers):
        o = ops.rope_attention(ops.qkv(h, lw.wqkv, lw.bqkv), pos, slot, fm.cos, fm.sin, k[i], v[i], fm.n_heads,
                               fm.n_kv, splits)
        x, h = ops.add_rmsnorm(x, ops.o(o, lw.wo), lw.post_norm, fm.eps)
        m = ops.mlp_in(h, lw.wgu)
        nxt = fm.layers[i + 1].in_norm if i + 1 < len(fm.layers) else fm.norm
        x, h = ops.add_rmsnorm(x, ops.down(m, lw.wdown), nxt, fm.eps)
    return ops.head(h, fm.lm_head, out)


def _causal_attention(q: torch.Tensor, keys: torch.Tensor, vals: torch.Tensor) -> torch.Tensor:
    """q [B, T, H, D], keys/vals [B, T, Hkv, D] -> [B * T, H * D]; KV heads repeated so SDPA can take flash."""
    b, t, h, d = q.shape
    g = h // keys.shape[2]
    if g > 1:
        keys, vals = keys.repeat_interleave(g, dim=2), vals.repeat_interleave(g, dim=2)
    o = F.scaled_dot_product_attention(q.transpose(1, 2), keys.transpose(1, 2), vals.transpose(1, 2), is_causal=True)
    return o.transpose(1, 2).reshape(b * t, h * d)


def prefill_step(fm: FusedModel, ops: SimpleNamespace, tokens: torch.Tensor, slots: torch.Tensor, last: torch.Tensor,
                 k: torch.Tensor, v: torch.Tensor, on_layer: Callable[[int], None] | None = None) -> torch.Tensor:
    """Prompts tokens [B, T] (right-padded) from position 0 into KV slots `slots` [B]; logits [B, V] of the rows
    `last` [B] (each prompt's last real token). Causal attention over the prompt itself, so padding after a
    prompt's end never reaches its real tokens. `on_layer(i)` after layer i (its K/V are written by then)."""
    b, t = tokens.shape
    pos = torch.arange(t, device=tokens.device).repeat(b)
    slot = slots.repeat_interleave(t)
    x = F.embedding(tokens.reshape(-1), fm.embed)
    h = ops.rmsnorm(x, fm.layers[0].in_norm, fm.eps)
    for i, lw in enumerate(fm.layers):
        qkv = F.linear(h, lw.wqkv, lw.bqkv)
        q = ops.rope_kv(qkv, pos, slot, fm.cos, fm.sin, k[i], v[i], fm.n_heads, fm.n_kv)
        o = _causal_attention(q.view(b, t, fm.n_heads, -1), k[i][slots, :t], v[i][slots, :t])
        x, h = ops.add_rmsnorm(x, F.linear(o, lw.wo), lw.post_norm, fm.eps)
        m = ops.silu_mul(F.linear(h, lw.wgu))
        nxt = fm.layers[i + 1].in_norm if i + 1 < len(fm.layers) else fm.norm
        x, h = ops.add_rmsnorm(x, F.linear(m, lw.wdown), nxt, fm.eps)
        if on_layer is not None:
            on_layer(i)
    return F.linear(h[torch.arange(b, device=tokens.device) * t + last], fm.lm_head)
