"""A compact Llama-family decoder (RMSNorm, RoPE, GQA, SwiGLU) that reads and writes a caller-owned KVBuffer."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from services.engine.config import ModelConfig
from services.engine.kv import KVBuffer
from services.engine.layers import RMSNorm, SwiGLU, apply_rope, rope_cos_sin, rope_inv_freq

Slots = slice | torch.Tensor


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv, self.hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_buf: torch.Tensor,
                v_buf: torch.Tensor, slots: Slots, pos: torch.Tensor, mask: torch.Tensor, kv_len: int) -> torch.Tensor:
        B, T, _ = x.shape
        q = apply_rope(self.q_proj(x).view(B, T, self.n_heads, self.hd), cos, sin)
        k = apply_rope(self.k_proj(x).view(B, T, self.n_kv, self.hd), cos, sin)
        v = self.v_proj(x).view(B, T, self.n_kv, self.hd)
        rows = torch.arange(B, device=x.device)[:, None]
        if isinstance(slots, slice):
            kb, vb = k_buf[slots], v_buf[slots]  # views: the dense-batch fast path
            kb[rows, pos], vb[rows, pos] = k, v
        else:
            k_buf[slots[:, None], pos], v_buf[slots[:, None], pos] = k, v
            kb, vb = k_buf[slots], v_buf[slots]
        keys = kb[:, :kv_len].transpose(1, 2)  # [B, H_kv, L, D]
        vals = vb[:, :kv_len].transpose(1, 2)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), keys, vals, attn_mask=mask,
                                             enable_gqa=self.n_kv != self.n_heads)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = SwiGLU(cfg.dim, cfg.hidden_dim)

    def forward(self, x: torch.Tensor, *attn_args) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), *attn_args)
        return x + self.mlp(self.post_attention_layernorm(x))


class Transformer(nn.Module):
    """Parameter names follow Hugging Face's Llama (`model.` prefix dropped) so checkpoints load by name."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.register_buffer("inv_freq", rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling), persistent=False)

    def forward(self, tokens: torch.Tensor, kv: KVBuffer, slots: Slots, starts: list[int],
                n_new: list[int] | None = None, logits_at: list[int] | None = None) -> torch.Tensor:
        """Run `tokens` [B, T] (right-padded) whose first token sits at position `starts[b]` of its slot.

        Writes their K/V into `kv`, sets `kv.lengths` to start + n_new, and returns logits [B, T, V], or
        [B, V] at row offsets `logits_at` (e.g. each prompt's last real token).
        """
        B, T = tokens.shape
        n_new = n_new if n_new is not None else [T] * B
        slot_ids = range(slots.start or 0, slots.stop) if isinstance(slots, slice) else slots.tolist()
        kv_len = max(s + T for s in starts)
        if kv_len > kv.capacity:
            kv.reserve(slot_ids[0], kv_len)  # raises with a clear message
        device = tokens.device
        start_t = torch.tensor(starts, device=device)
        pos = start_t[:, None] + torch.arange(T, device=device)  # [B, T]
        mask = (torch.arange(kv_len, device=device)[None, None, :] <= pos[:, :, None])[:, None]  # [B,1,T,L]
        cos, sin = rope_cos_sin(self.inv_freq, pos, kv.dtype)
        x = self.embed_tokens(tokens)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, kv.k[i], kv.v[i], slots, pos, mask, kv_len)
        for s, start, n in zip(slot_ids, starts, n_new, strict=True):
            kv.lengths[s] = start + n
        if logits_at is not None:
            x = x[torch.arange(B, device=device), torch.tensor(logits_at, device=device)]
        return self.lm_head(self.norm(x))
