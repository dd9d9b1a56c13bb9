"""The bidirectional masked diffusion LM: a full forward, and a windowed forward over positions
[start, L) whose queries attend to a frozen per-layer K/V store for [0, start) plus fresh window K/V."""

from __future__ import annotations

import torch

from services.dlm.layers import DLMConfig, DLMTransformer


class WindowKV:
    """Per-layer rotated K/V for every position of the sequence; FreeCache reads the frozen part from it."""

    __slots__ = ("k", "v")

    def __init__(self, cfg: DLMConfig, batch: int, length: int, device: torch.device, dtype: torch.dtype) -> None:
        shape = (cfg.n_layers, batch, cfg.n_heads, length, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)


class DiffusionLM(DLMTransformer):
    """No causal mask anywhere: every position sees every other (LLaDA)."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.forward_window(ids, 0, None)

    def forward_window(self, window: torch.Tensor, start: int, store: WindowKV | None) -> torch.Tensor:
        """Logits for the tokens `window` at positions start..start+W; writes their K/V into `store`."""
        w = window.shape[1]
        if start > 0 and store is None:
            raise ValueError("a window that starts after 0 needs the K/V store of the positions before it")
        cos, sin = self.cos[start:start + w], self.sin[start:start + w]
        x = self.embed(window)
        for i, blk in enumerate(self.blocks):
            prefix = None if store is None else (store.k[i, :, :, :start], store.v[i, :, :, :start])
            x, k, v = blk(x, cos, sin, prefix=prefix)
            if store is not None:
                store.k[i, :, :, start:start + w] = k
                store.v[i, :, :, start:start + w] = v
        return self.head(self.norm(x)).float()
