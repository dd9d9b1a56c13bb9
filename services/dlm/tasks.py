"""The task corpus: reversal, sorting and addition of digit strings, each with one checkable answer.

Prompts are left-padded with [PAD] to a fixed width P and responses right-padded with [EOS] to G, so a
batch is one rectangular tensor and accuracy is exact match of the decoded answer.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from services.dlm.tokenizer import CharTokenizer

PROMPT_LEN = 24
GEN_LEN = 24
TASKS = ("rev", "sort", "add")


@dataclass(frozen=True, slots=True)
class Example:
    task: str
    prompt: str
    answer: str


def make_example(rng: random.Random, task: str | None = None) -> Example:
    task = task or rng.choice(TASKS)
    if task == "add":
        a, b = (rng.randrange(10 ** rng.randint(1, 10)) for _ in range(2))
        return Example(task, f"A{a:010d}+{b:010d}=", f"{a + b:011d}")
    n = rng.randint(8, 20)
    digits = "".join(rng.choice("0123456789") for _ in range(n))
    if task == "rev":
        return Example(task, f"R{digits}=", digits[::-1])
    if task == "sort":
        return Example(task, f"S{digits}=", "".join(sorted(digits)))
    raise ValueError(f"unknown task {task!r}")


def answer_of(prompt: str) -> str:
    """The reference answer for any well-formed prompt (used to score free-form server requests too)."""
    op, body = prompt[0], prompt[1:].rstrip("=")
    if op == "R":
        return body[::-1]
    if op == "S":
        return "".join(sorted(body))
    a, b = body.split("+")
    return f"{int(a) + int(b):011d}"


def eval_set(n: int, seed: int = 12345) -> list[Example]:
    """Held out by seed: training draws from seeds < 10_000, evaluation from this fixed seed."""
    rng = random.Random(seed)
    return [make_example(rng, TASKS[i % len(TASKS)]) for i in range(n)]


def encode_prompt(tok: CharTokenizer, prompt: str, prompt_len: int = PROMPT_LEN) -> list[int]:
    from services.contracts.errors import InvalidArgument

    ids = tok.encode(prompt)
    if not ids:
        raise InvalidArgument("prompt: must not be empty", param="prompt")
    if len(ids) > prompt_len:
        raise InvalidArgument(f"prompt: {len(ids)} characters, the model takes at most {prompt_len}",
                              param="prompt")
    return [tok.pad_id] * (prompt_len - len(ids)) + ids


def encode_example(tok: CharTokenizer, ex: Example, prompt_len: int = PROMPT_LEN,
                   gen_len: int = GEN_LEN) -> list[int]:
    ans = tok.encode(ex.answer, field="answer")
    return encode_prompt(tok, ex.prompt, prompt_len) + ans + [tok.eos_id] * (gen_len - len(ans))


def batch(tok: CharTokenizer, rng: random.Random, n: int) -> list[list[int]]:
    return [encode_example(tok, make_example(rng)) for _ in range(n)]
