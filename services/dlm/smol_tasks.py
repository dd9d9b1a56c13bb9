"""The task corpus as text for the SmolLM2-tokenizer DLM: `copy 4829 =` -> ` 4829`, `reverse`, `sort`, and
`27+815 =` -> ` 842`; every answer ends with a newline, the response terminator both models agree on."""

from __future__ import annotations

import random
from dataclasses import dataclass

TASKS = ("copy", "rev", "sort", "add")
PROMPT_LEN = 12   # SmolLM2 tokens, prompt left-padded to this width (digits are single tokens in SmolLM2)
GEN_LEN = 8       # " " + up to 6 digits + "\n", then more "\n" fill


@dataclass(frozen=True, slots=True)
class TextExample:
    task: str
    prompt: str
    answer: str   # without the leading space and the trailing newline


def make_example(rng: random.Random, task: str | None = None) -> TextExample:
    task = task or rng.choice(TASKS)
    if task == "add":
        a, b = (rng.randrange(10 ** rng.randint(1, 3)) for _ in range(2))
        return TextExample(task, f"{a}+{b} =", str(a + b))
    digits = "".join(rng.choice("0123456789") for _ in range(rng.randint(3, 6)))
    if task == "copy":
        return TextExample(task, f"copy {digits} =", digits)
    if task == "rev":
        return TextExample(task, f"reverse {digits} =", digits[::-1])
    if task == "sort":
        return TextExample(task, f"sort {digits} =", "".join(sorted(digits)))
    raise ValueError(f"unknown task {task!r}")


def response_text(ex: TextExample) -> str:
    return f" {ex.answer}\n"


def eval_set(n: int, seed: int = 12345) -> list[TextExample]:
    """Held out by seed: training draws from seeds < 10_000."""
    rng = random.Random(seed)
    return [make_example(rng, TASKS[i % len(TASKS)]) for i in range(n)]


def preamble(seed: int = 999, per_task: int = 2) -> str:
    """Worked examples the guide (and only the guide) reads before each prompt: SmolLM2-135M knows none of
    these formats, and a few lines of in-context examples let it judge the drafts at all."""
    rng = random.Random(seed)
    lines = [make_example(rng, t) for _ in range(per_task) for t in TASKS]
    return "".join(ex.prompt + response_text(ex) for ex in lines)
