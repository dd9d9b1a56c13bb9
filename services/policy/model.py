"""Transformer action denoiser in Diffusion Policy's layout, with a per-block cache hook for BAC.

Condition tokens = [time embedding, observation tokens] → MLP encoder → memory. Noisy actions →
input embedding + position → n pre-norm decoder layers of three residual blocks (self-attention,
cross-attention, FFN) with Diffusion Policy's causal masks → LayerNorm → head.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

KINDS = ("sa", "ca", "ffn")


@dataclass(slots=True)
class DenoiserConfig:
    act_dim: int = 2
    obs_dim: int = 7
    horizon: int = 16
    n_obs_steps: int = 2
    n_layer: int = 6
    n_head: int = 4
    n_emb: int = 128

    @property
    def n_blocks(self) -> int:
        return 3 * self.n_layer

    def to_dict(self) -> dict:
        return asdict(self)


def block_name(b: int) -> str:
    return f"L{b // 3}.{KINDS[b % 3]}"


class BlockHook(Protocol):
    """Decides, per residual block, whether to compute it or reuse a cached output."""

    def run(self, b: int, compute: Callable[[], torch.Tensor]) -> torch.Tensor: ...


def time_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(torch.arange(half, device=t.device, dtype=torch.float32) * (-math.log(10000.0) / (half - 1)))
    arg = t.float()[:, None] * freqs[None]
    return torch.cat([arg.sin(), arg.cos()], -1)


class DenoiserAttention(nn.Module):
    def __init__(self, n_emb: int, n_head: int) -> None:
        super().__init__()
        self.n_head = n_head
        self.q = nn.Linear(n_emb, n_emb)
        self.kv = nn.Linear(n_emb, 2 * n_emb)
        self.out = nn.Linear(n_emb, n_emb)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        h = self.n_head
        q = self.q(x).view(b, t, h, c // h).transpose(1, 2)
        k, v = self.kv(ctx).view(b, ctx.shape[1], 2, h, c // h).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out(y.transpose(1, 2).reshape(b, t, c))


class DecoderLayer(nn.Module):
    """Pre-norm layer; each residual branch is one cacheable block."""

    def __init__(self, n_emb: int, n_head: int) -> None:
        super().__init__()
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(n_emb), nn.LayerNorm(n_emb), nn.LayerNorm(n_emb)
        self.sa = DenoiserAttention(n_emb, n_head)
        self.ca = DenoiserAttention(n_emb, n_head)
        self.ffn = nn.Sequential(nn.Linear(n_emb, 4 * n_emb), nn.GELU(), nn.Linear(4 * n_emb, n_emb))

    def branch(self, kind: int, x: torch.Tensor, memory: torch.Tensor, masks: tuple) -> torch.Tensor:
        if kind == 0:
            h = self.norm1(x)
            return self.sa(h, h, masks[0])
        if kind == 1:
            return self.ca(self.norm2(x), memory, masks[1])
        return self.ffn(self.norm3(x))


class Denoiser(nn.Module):
    """ε-prediction network: (noisy actions (B,T,A), timestep (B,), obs (B,To,O)) → ε (B,T,A)."""

    def __init__(self, cfg: DenoiserConfig) -> None:
        super().__init__()
        self.cfg = cfg
        e = cfg.n_emb
        self.input_emb = nn.Linear(cfg.act_dim, e)
        self.pos_emb = nn.Parameter(torch.zeros(1, cfg.horizon, e))
        self.cond_obs_emb = nn.Linear(cfg.obs_dim, e)
        self.cond_pos_emb = nn.Parameter(torch.zeros(1, 1 + cfg.n_obs_steps, e))
        self.encoder = nn.Sequential(nn.Linear(e, 4 * e), nn.Mish(), nn.Linear(4 * e, e))
        self.layers = nn.ModuleList(DecoderLayer(e, cfg.n_head) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(e)
        self.head = nn.Linear(e, cfg.act_dim)
        t, s = torch.arange(cfg.horizon)[:, None], torch.arange(1 + cfg.n_obs_steps)[None]
        # causal self-attention; action i sees the time token and observations up to index i (as in DP)
        self.register_buffer("sa_mask", t >= t.T, persistent=False)
        self.register_buffer("ca_mask", t >= s - 1, persistent=False)
        self.apply(self._init)
        nn.init.normal_(self.pos_emb, std=0.02)
        nn.init.normal_(self.cond_pos_emb, std=0.02)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)

    def memory(self, timestep: torch.Tensor, obs: torch.Tensor) -> torch.Tensor:
        temb = time_embedding(timestep, self.cfg.n_emb)[:, None]
        cond = torch.cat([temb, self.cond_obs_emb(obs)], 1) + self.cond_pos_emb
        return self.encoder(cond)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, obs: torch.Tensor,
                hook: BlockHook | None = None) -> torch.Tensor:
        memory = self.memory(timestep.expand(sample.shape[0]), obs)
        x = self.input_emb(sample) + self.pos_emb
        masks = (self.sa_mask, self.ca_mask)
        for li, layer in enumerate(self.layers):
            for kind in range(3):
                if hook is None:
                    y = layer.branch(kind, x, memory, masks)
                else:
                    y = hook.run(3 * li + kind, lambda k=kind, la=layer, h=x: la.branch(k, h, memory, masks))
                x = x + y
        return self.head(self.ln_f(x))
