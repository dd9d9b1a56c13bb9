"""Token ids -> text deltas that are UTF-8 safe and never show a stop string (or the start of one)."""

from __future__ import annotations

from typing import Any


class TextStream:
    """Incremental detokenizer with stop strings: text that may begin a stop string is held back until it cannot."""

    __slots__ = ("decoder", "stop", "pending", "stopped")

    def __init__(self, tokenizer: Any, stop: tuple[str, ...] = ()) -> None:
        self.decoder = tokenizer.stream(skip_special_tokens=True)
        self.stop = stop
        self.pending = ""  # decoded text not yet released
        self.stopped = False

    def push(self, token_id: int) -> str:
        """The text this token releases; after a stop string matched, always ''."""
        if self.stopped:
            return ""
        self.pending += self.decoder.push(token_id)
        return self._release(final=False)

    def finish(self) -> str:
        """Everything still held back (the stream ended without a stop string)."""
        if self.stopped:
            return ""
        self.pending += self.decoder.flush()
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        text = self.pending
        hits = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        if hits:
            self.stopped, self.pending = True, ""
            return text[: min(hits)]
        hold = 0 if final else max((k for s in self.stop for k in range(1, len(s)) if text.endswith(s[:k])),
                                   default=0)
        cut = len(text) - hold
        self.pending = text[cut:]
        return text[:cut]
