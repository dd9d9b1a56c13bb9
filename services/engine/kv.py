"""KV cache ownership: a slot-contiguous buffer the caller holds; per-layer export/import as raw tensors.

A buffer of one slot is one request's cache. A decode scheduler holds a buffer of many slots and keeps
the live ones dense (slots 0..n-1), so a batched step reads a view, never a gathered copy.
"""

from __future__ import annotations

import torch

from services.contracts.errors import InvalidArgument, ResourceExhausted
from services.engine.config import ModelConfig


class KVBuffer:
    """K and V of shape [n_layers, slots, capacity, n_kv_heads, head_dim]; `lengths[s]` tokens valid in slot s."""

    __slots__ = ("cfg", "k", "v", "lengths")

    def __init__(self, cfg: ModelConfig, slots: int, capacity: int, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32) -> None:
        if slots < 1 or capacity < 1:
            raise InvalidArgument(f"KV buffer needs slots >= 1 and capacity >= 1 (got {slots}, {capacity})")
        shape = (cfg.n_layers, slots, capacity, cfg.n_kv_heads, cfg.head_dim)
        self.cfg = cfg
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.lengths = [0] * slots

    @property
    def slots(self) -> int:
        return self.k.shape[1]

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    @property
    def dtype(self) -> torch.dtype:
        return self.k.dtype

    @property
    def device(self) -> torch.device:
        return self.k.device

    def bytes_per_token(self) -> int:
        return self.cfg.kv_bytes_per_token(self.k.element_size())

    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def reserve(self, slot: int, n_tokens: int) -> None:
        """Fail clearly when `slot` cannot hold `n_tokens`."""
        if n_tokens > self.capacity:
            raise ResourceExhausted(f"sequence of {n_tokens} tokens exceeds the KV capacity of {self.capacity}")
        if not 0 <= slot < self.slots:
            raise InvalidArgument(f"slot {slot} out of range 0..{self.slots - 1}")

    def export_layer(self, slot: int, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Contiguous copies of layer `layer` of `slot`: two tensors [length, n_kv_heads, head_dim]."""
        n = self.lengths[slot]
        return self.k[layer, slot, :n].contiguous(), self.v[layer, slot, :n].contiguous()

    def export(self, slot: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [self.export_layer(slot, layer) for layer in range(self.cfg.n_layers)]

    def import_layer(self, slot: int, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Install one layer; shapes and dtype must match this buffer exactly (no silent casts)."""
        want = (self.cfg.n_kv_heads, self.cfg.head_dim)
        for name, t in (("k", k), ("v", v)):
            if t.dim() != 3 or tuple(t.shape[1:]) != want:
                raise InvalidArgument(f"layer {layer} {name}: shape {tuple(t.shape)} does not match [n, {want[0]}, {want[1]}]")
            if t.dtype != self.dtype:
                raise InvalidArgument(f"layer {layer} {name}: dtype {t.dtype} does not match {self.dtype}")
        if k.shape[0] != v.shape[0]:
            raise InvalidArgument(f"layer {layer}: k has {k.shape[0]} tokens but v has {v.shape[0]}")
        if not 0 <= layer < self.cfg.n_layers:
            raise InvalidArgument(f"layer {layer} out of range 0..{self.cfg.n_layers - 1}")
        self.reserve(slot, k.shape[0])
        self.k[layer, slot, : k.shape[0]] = k.to(self.device)
        self.v[layer, slot, : v.shape[0]] = v.to(self.device)

    def import_all(self, slot: int, layers: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        if len(layers) != self.cfg.n_layers:
            raise InvalidArgument(f"got {len(layers)} layers, the model has {self.cfg.n_layers}")
        for i, (k, v) in enumerate(layers):
            self.import_layer(slot, i, k, v)
        self.lengths[slot] = layers[0][0].shape[0]

    def move(self, src: int, dst: int) -> None:
        """Copy slot `src` into `dst` (Flover's compaction); `src` becomes empty."""
        if src == dst:
            return
        n = self.lengths[src]
        self.k[:, dst, :n] = self.k[:, src, :n]
        self.v[:, dst, :n] = self.v[:, src, :n]
        self.lengths[dst], self.lengths[src] = n, 0

    def clear(self, slot: int) -> None:
        self.lengths[slot] = 0

    def grow(self, capacity: int) -> None:
        """Reallocate to a larger capacity, keeping contents."""
        if capacity > self.capacity:
            self.resize(self.slots, capacity)

    def resize(self, slots: int, capacity: int) -> None:
        """Reallocate to `slots` x `capacity`, keeping every slot below `slots` (and its tokens) that still fits."""
        if slots < 1 or capacity < 1:
            raise InvalidArgument(f"KV buffer needs slots >= 1 and capacity >= 1 (got {slots}, {capacity})")
        keep = min(slots, self.slots)
        if any(n > capacity for n in self.lengths[:keep]):
            raise InvalidArgument(f"cannot shrink the KV capacity to {capacity}: a slot holds more tokens")
        n = min(capacity, self.capacity)
        for name in ("k", "v"):
            old = getattr(self, name)
            new = old.new_zeros(old.shape[:1] + (slots, capacity) + old.shape[3:])
            new[:, :keep, :n] = old[:, :keep, :n]
            setattr(self, name, new)
        self.lengths = self.lengths[:keep] + [0] * (slots - keep)
