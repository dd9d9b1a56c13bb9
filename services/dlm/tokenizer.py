"""Character-level tokenizer for the task corpus, with the [PAD], [MASK] and [EOS] specials both models share."""

from __future__ import annotations

from dataclasses import dataclass

from services.contracts.errors import InvalidArgument

SPECIALS = ("[PAD]", "[MASK]", "[EOS]")
CHARS = "0123456789+=ARS"


@dataclass(frozen=True, slots=True)
class CharTokenizer:
    """Ids 0..2 are specials; every other id is one character of `chars`."""

    chars: str = CHARS
    name: str = "tandem-char-v1"

    pad_id: int = 0
    mask_id: int = 1
    eos_id: int = 2

    @property
    def vocab_size(self) -> int:
        return len(SPECIALS) + len(self.chars)

    def encode(self, text: str, *, field: str = "prompt") -> list[int]:
        ids = []
        for i, ch in enumerate(text):
            k = self.chars.find(ch)
            if k < 0:
                raise InvalidArgument(f"{field}: character {ch!r} at position {i} is not in the vocabulary "
                                      f"{self.chars!r}", param=field)
            ids.append(len(SPECIALS) + k)
        return ids

    def decode(self, ids: list[int], *, stop_at_eos: bool = True) -> str:
        out = []
        for t in ids:
            if t == self.eos_id and stop_at_eos:
                break
            if t >= len(SPECIALS):
                out.append(self.chars[t - len(SPECIALS)])
        return "".join(out)

    def to_dict(self) -> dict:
        return {"name": self.name, "chars": self.chars}

    @classmethod
    def from_dict(cls, d: dict) -> CharTokenizer:
        return cls(chars=d["chars"], name=d["name"])
