"""The small autoregressive guide: a causal transformer with its own K/V cache that can be cropped back
to the committed prefix when the guide rejects a draft."""

from __future__ import annotations

import torch

from services.dlm.layers import DLMTransformer


class GuideCache:
    """Per-layer K/V of the first `length` tokens the guide has read."""

    __slots__ = ("k", "v", "length")

    def __init__(self) -> None:
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self.length = 0

    def crop(self, n: int) -> None:
        if n < self.length:
            self.k = [k[:, :, :n] for k in self.k]
            self.v = [v[:, :, :n] for v in self.v]
            self.length = n


class ARGuide(DLMTransformer):
    """Causal LM; `extend` reads new tokens after the cache and returns next-token logits for each."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.extend(ids, GuideCache())

    def extend(self, ids: torch.Tensor, cache: GuideCache) -> torch.Tensor:
        start, t = cache.length, ids.shape[1]
        cos, sin = self.cos[start:start + t], self.sin[start:start + t]
        x = self.embed(ids)
        for i, blk in enumerate(self.blocks):
            prefix = (cache.k[i], cache.v[i]) if start > 0 else None
            x, k, v = blk(x, cos, sin, prefix=prefix, causal=True)
            if prefix is None:
                cache.k.append(k)
                cache.v.append(v)
            else:
                cache.k[i] = torch.cat([prefix[0], k], dim=2)
                cache.v[i] = torch.cat([prefix[1], v], dim=2)
        cache.length = start + t
        return self.head(self.norm(x)).float()
