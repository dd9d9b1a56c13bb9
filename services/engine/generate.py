"""Single-request generation loop: prefill, decode until EOS, max tokens or a stop string; streams ids or text."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

from services.contracts.errors import InvalidArgument
from services.engine.engine import Engine
from services.engine.sampling import Sampler, SamplingParams


@dataclass(slots=True)
class GenStats:
    """Filled in while a generation runs; final once its iterator is exhausted."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str | None = None  # "stop" (EOS or stop string) | "length"
    prefill_s: float = 0.0
    decode_s: float = 0.0  # after the first token

    @property
    def decode_tokens_per_s(self) -> float:
        n = self.completion_tokens - 1
        return n / self.decode_s if n > 0 and self.decode_s > 0 else 0.0


class StopMatcher:
    """Turns token ids into text deltas that never contain a stop string, holding back a possible partial match."""

    __slots__ = ("decoder", "stop", "text", "sent", "stopped")

    def __init__(self, engine: Engine, stop: tuple[str, ...]) -> None:
        if engine.tokenizer is None:
            raise InvalidArgument("stop strings need a model with a tokenizer", param="stop")
        self.decoder = engine.tokenizer.stream()
        self.stop = stop
        self.text, self.sent, self.stopped = "", 0, False

    def push(self, token_id: int) -> str:
        self.text += self.decoder.push(token_id)
        return self._release(final=False)

    def flush(self) -> str:
        if not self.stopped:
            self.text += self.decoder.flush()
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if self.stopped:
            return ""
        hits = [i for i in (self.text.find(s, max(0, self.sent - len(s))) for s in self.stop) if i >= 0]
        if hits:
            self.stopped = True
            end = min(hits)
        elif final:
            end = len(self.text)
        else:  # keep back the longest tail that could still grow into a stop string
            hold = max((k for s in self.stop for k in range(1, len(s)) if self.text.endswith(s[:k])), default=0)
            end = len(self.text) - hold
        out = self.text[self.sent:end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return out


def generate(engine: Engine, prompt_ids: list[int], params: SamplingParams,
             stats: GenStats | None = None) -> Iterator[int]:
    """Yield sampled token ids (EOS is not yielded). With stop strings, the last id yielded is the one whose
    text completes a stop string; `generate_text` cuts the text there."""
    for token, _delta in _run(engine, prompt_ids, params, stats, text=bool(params.validate().stop)):
        if token >= 0:
            yield token


def generate_text(engine: Engine, prompt_ids: list[int], params: SamplingParams,
                  stats: GenStats | None = None) -> Iterator[str]:
    """Yield text deltas of the continuation (stop strings excluded); needs `engine.tokenizer`."""
    if engine.tokenizer is None:
        raise InvalidArgument("text generation needs a model with a tokenizer", param="model")
    for _, delta in _run(engine, prompt_ids, params, stats, text=True):
        if delta:
            yield delta


def _run(engine: Engine, prompt_ids: list[int], params: SamplingParams, stats: GenStats | None,
         text: bool) -> Iterator[tuple[int, str]]:
    params.validate()
    engine.check_prompt(prompt_ids, params.max_tokens)
    stats = stats if stats is not None else GenStats()
    stats.prompt_tokens = len(prompt_ids)
    sampler = Sampler(params)
    matcher = StopMatcher(engine, params.stop) if text else None
    eos = set() if params.ignore_eos else set(engine.cfg.eos_ids)
    # Exactly the positions this request can use: the last sampled token is never fed back.
    kv = engine.new_kv(1, len(prompt_ids) + params.max_tokens - 1 or 1)
    t0 = time.perf_counter()
    logits = engine.prefill([prompt_ids], kv, [0])
    token = sampler.sample(logits[0])
    stats.prefill_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    while True:
        if token in eos:
            stats.finish_reason = "stop"
            break
        stats.completion_tokens += 1
        delta = matcher.push(token) if matcher else ""
        if matcher and matcher.stopped:
            stats.finish_reason = "stop"
            yield token, delta
            break
        if stats.completion_tokens >= params.max_tokens:
            stats.finish_reason = "length"
            yield token, delta + (matcher.flush() if matcher else "")
            break
        yield token, delta
        token = sampler.sample(engine.decode([token], kv, slice(0, 1))[0])
        stats.decode_s = time.perf_counter() - t1
    if matcher and stats.finish_reason == "stop" and not matcher.stopped:
        tail = matcher.flush()  # EOS: release what was held back for a possible stop match
        if tail:
            yield -1, tail
    stats.decode_s = time.perf_counter() - t1
