"""Tandem's engine (SmolLM2-135M) as the Guided-Diffusion guide: the ARGuide interface (`cfg`, `new_cache`,
`extend`) over an engine KVBuffer that is cropped by setting its length back."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from services.contracts.errors import InvalidArgument
from services.dlm.smol import tokenizer_fingerprint


@dataclass(frozen=True, slots=True)
class GuideShape:
    vocab_size: int
    max_len: int


class EngineGuideCache:
    """What the guide has read, in the sampler's positions (`length`), and the engine cache behind it.

    Skipped ids (the DLM's left padding) take a position here but nothing in the engine cache: SmolLM2
    never reads padding it was not trained on. `kv_ids` are the ids in the engine cache (preamble first).
    """

    __slots__ = ("kv", "ids", "kv_ids", "last")

    def __init__(self, kv, kv_ids: list[int], last: torch.Tensor | None) -> None:
        self.kv, self.kv_ids, self.last = kv, kv_ids, last
        self.ids: list[int] = []

    @property
    def length(self) -> int:
        return len(self.ids)

    def crop(self, n: int) -> None:
        if n < len(self.ids):
            dropped = sum(1 for t in self.ids[n:] if t >= 0)
            self.ids = self.ids[:n]
            keep = len(self.kv_ids) - dropped
            self.kv_ids = self.kv_ids[:keep]
            self.kv.lengths[0] = keep  # the engine's cache is cropped by its length: later writes overwrite
            self.last = None           # next-token logits of the new end: recomputed if a skip row needs them


class EngineGuide:
    """`extend(ids [1, t], cache)` returns next-token logits [1, t, V] for each new position, like ARGuide.

    `preamble` (text) is read once and its K/V copied into every new cache: in-context examples the guide
    sees before the prompt. `skip_ids` are read as "no token" (their row repeats the previous logits).
    """

    def __init__(self, engine, *, preamble: str = "", skip_ids: tuple[int, ...] = (0,)) -> None:
        self.engine = engine
        self.vocab_name = tokenizer_fingerprint(engine.tokenizer)
        self.skip = set(skip_ids)
        self.pre_ids = engine.tokenizer.encode(preamble, add_special_tokens=False) if preamble else []
        self.cfg = GuideShape(engine.cfg.vocab_size, engine.cfg.max_seq_len - len(self.pre_ids))
        self.pre_kv, self.pre_last = None, None
        if self.pre_ids:
            self.pre_kv = engine.new_kv(1, len(self.pre_ids))
            self.pre_last = engine.prefill([self.pre_ids], self.pre_kv, [0])[0]

    def new_cache(self, capacity: int = 64) -> EngineGuideCache:
        n = len(self.pre_ids)
        kv = self.engine.new_kv(1, n + capacity)
        if n:
            kv.k[:, 0, :n] = self.pre_kv.k[:, 0, :n]
            kv.v[:, 0, :n] = self.pre_kv.v[:, 0, :n]
            kv.lengths[0] = n
        return EngineGuideCache(kv, list(self.pre_ids), self.pre_last)

    @torch.inference_mode()
    def _read(self, cache: EngineGuideCache, toks: list[int]) -> torch.Tensor:
        """Append real tokens to the engine cache; logits [len(toks), V] after each."""
        kv, start = cache.kv, cache.kv.lengths[0]
        if start + len(toks) > kv.capacity:
            kv.grow(max(start + len(toks), 2 * kv.capacity))
        t = torch.tensor([toks], dtype=torch.long, device=self.engine.device)
        out = self.engine.model(t, kv, slice(0, 1), [start])[0].float()
        cache.kv_ids += toks
        return out

    def _last(self, cache: EngineGuideCache) -> torch.Tensor:
        if cache.last is None:
            if not cache.kv_ids:  # nothing read at all: no opinion, a flat distribution
                return torch.zeros(self.cfg.vocab_size, device=self.engine.device)
            tail = cache.kv_ids.pop()
            cache.kv.lengths[0] -= 1  # re-read the last real token to recover its next-token logits
            cache.last = self._read(cache, [tail])[-1]
        return cache.last

    @torch.inference_mode()
    def extend(self, ids: torch.Tensor, cache: EngineGuideCache) -> torch.Tensor:
        toks = ids[0].tolist()
        bad = [t for t in toks if not 0 <= t < self.cfg.vocab_size]
        if bad:
            raise InvalidArgument(f"guide: token id {bad[0]} is outside the guide's vocabulary "
                                  f"({self.cfg.vocab_size})", param="guide")
        real = [t for t in toks if t not in self.skip]
        prev = self._last(cache) if toks and toks[0] in self.skip else None
        out = self._read(cache, real) if real else None
        rows, r = [], -1
        for t in toks:
            if t in self.skip:
                rows.append(prev if r < 0 else out[r])
            else:
                r += 1
                rows.append(out[r])
        cache.ids += [-1 if t in self.skip else t for t in toks]
        if rows:
            cache.last = rows[-1]
        return torch.stack(rows)[None]
