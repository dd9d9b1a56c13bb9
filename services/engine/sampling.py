"""Per-request sampling: greedy, temperature, top-k, top-p, seeded and reproducible."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from services.contracts.errors import InvalidArgument


@dataclass(slots=True)
class SamplingParams:
    """What a request asks for. temperature 0 means greedy. `stop` strings are matched on text by the caller."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    ignore_eos: bool = False

    def validate(self) -> SamplingParams:
        def bad(name: str, why: str) -> InvalidArgument:
            return InvalidArgument(f"{name}: {why} (got {getattr(self, name)!r})", param=name)

        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise bad("max_tokens", "must be an integer >= 1")
        if not isinstance(self.temperature, (int, float)) or not math.isfinite(self.temperature) or self.temperature < 0:
            raise bad("temperature", "must be a finite number >= 0")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise bad("top_k", "must be an integer >= 0")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise bad("top_p", "must be in (0, 1]")
        if self.seed is not None and (not isinstance(self.seed, int) or self.seed < 0):
            raise bad("seed", "must be a non-negative integer")
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise bad("stop", "must be non-empty strings")
        self.stop = tuple(self.stop)
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


class Sampler:
    """Samples one request's tokens; its own generator makes a seeded request reproducible in any batch."""

    __slots__ = ("params", "generator")

    def __init__(self, params: SamplingParams) -> None:
        self.params = params.validate()
        self.generator = torch.Generator(device="cpu")
        if params.seed is not None:
            self.generator.manual_seed(params.seed)
        else:
            self.generator.seed()

    def sample(self, logits: torch.Tensor) -> int:
        """logits: [V] (any device, float)."""
        p = self.params
        if p.greedy:
            return int(torch.argmax(logits).item())
        logits = logits.float().cpu() / p.temperature
        if p.top_k > 0:
            kth = torch.topk(logits, min(p.top_k, logits.numel())).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        if p.top_p < 1.0:
            sorted_p, order = torch.sort(probs, descending=True)
            # keep the smallest prefix whose mass reaches top_p (always at least one token)
            drop = torch.cumsum(sorted_p, 0) - sorted_p >= p.top_p
            sorted_p = sorted_p.masked_fill(drop, 0.0)
            probs = torch.zeros_like(probs).scatter(0, order, sorted_p)
        return int(torch.multinomial(probs, 1, generator=self.generator).item())


def sample_batch(logits: torch.Tensor, samplers: list[Sampler]) -> list[int]:
    """One token per row; greedy rows share one argmax (a single device sync)."""
    greedy = [i for i, s in enumerate(samplers) if s.params.greedy]
    out = [0] * len(samplers)
    if greedy:
        picks = torch.argmax(logits[greedy], dim=-1).tolist()
        for i, t in zip(greedy, picks, strict=True):
            out[i] = t
    for i, s in enumerate(samplers):
        if not s.params.greedy:
            out[i] = s.sample(logits[i])
    return out
