"""Transformer pieces shared by the diffusion LM and its AR guide: RMSNorm, RoPE, a pre-norm block whose
attention can read a K/V prefix that was computed earlier (FreeCache's frozen store, the guide's cache)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from services.engine.layers import RMSNorm


@dataclass(frozen=True, slots=True)
class DLMConfig:
    vocab_size: int
    dim: int = 192
    n_layers: int = 6
    n_heads: int = 6
    ffn_dim: int = 512
    max_len: int = 64
    rope_theta: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def to_dict(self) -> dict:
        return asdict(self)


def rope_tables(head_dim: int, max_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    ang = torch.outer(torch.arange(max_len, dtype=torch.float32), inv)
    return ang.cos(), ang.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, H, T, D]; cos/sin: [T, D/2] for the absolute positions of the T tokens (rotate-half form)."""
    x1, x2 = x.float().chunk(2, dim=-1)
    c, s = cos[None, None], sin[None, None]
    return torch.cat([x1 * c - x2 * s, x1 * s + x2 * c], dim=-1).type_as(x)


class DLMBlock(nn.Module):
    """Pre-norm attention + SwiGLU. `prefix` K/V (already rotated) are attended to but not recomputed."""

    def __init__(self, cfg: DLMConfig) -> None:
        super().__init__()
        self.h, self.hd = cfg.n_heads, cfg.head_dim
        self.attn_norm, self.ffn_norm = RMSNorm(cfg.dim), RMSNorm(cfg.dim)
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim, bias=False)
        self.out = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.gate_up = nn.Linear(cfg.dim, 2 * cfg.ffn_dim, bias=False)
        self.down = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                prefix: tuple[torch.Tensor, torch.Tensor] | None = None, causal: bool = False,
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, t, _ = x.shape
        q, k, v = self.qkv(self.attn_norm(x)).view(b, t, 3, self.h, self.hd).permute(2, 0, 3, 1, 4)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        kk, vv = k, v
        if prefix is not None and prefix[0].shape[2] > 0:
            kk, vv = torch.cat([prefix[0], k], dim=2), torch.cat([prefix[1], v], dim=2)
        mask = None
        if causal and t > 1:
            p = kk.shape[2] - t  # every query sees the whole prefix, then the chunk causally
            mask = torch.ones(t, p + t, dtype=torch.bool, device=x.device).tril(diagonal=p)
        a = F.scaled_dot_product_attention(q, kk, vv, attn_mask=mask)
        x = x + self.out(a.transpose(1, 2).reshape(b, t, -1))
        g, u = self.gate_up(self.ffn_norm(x)).chunk(2, dim=-1)
        return x + self.down(F.silu(g) * u), k, v


class DLMTransformer(nn.Module):
    """Embedding, blocks, final norm and LM head; subclasses decide what K/V each block may read."""

    def __init__(self, cfg: DLMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.blocks = nn.ModuleList(DLMBlock(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim)
        self.head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        cos, sin = rope_tables(cfg.head_dim, cfg.max_len, cfg.rope_theta)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        self.apply(_init)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def _init(m: nn.Module) -> None:
    if isinstance(m, nn.Linear | nn.Embedding):
        nn.init.normal_(m.weight, std=0.02)
