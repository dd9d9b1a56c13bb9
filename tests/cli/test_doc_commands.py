"""Every `tandem ...` command shown in README.md and docs/ resolves to an existing verb, with flags that verb has.

Commands come from fenced code blocks (line continuations joined, shell comments dropped) and from inline code
spans that start with `tandem`. Placeholders stay as they are (LAYOUT, FILE, `[--n 30]` loses its brackets,
`...` is dropped) and `a|b|c` in verb position means each of a, b and c. Values are not checked, only that the
verb exists and that every option is one of its own (hidden old spellings count: they still work).
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import typer

from services.cli import app

ROOT = Path(__file__).resolve().parents[2]
FENCE = re.compile(r"^\s*(```|~~~)")
SPAN = re.compile(r"`([^`]+)`")
ENV = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=\S*$")
NUMBER = re.compile(r"^-\d")


def doc_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def _strip_comment(line: str) -> str:
    """Drop a shell comment (a # at the start or after a blank); `#` inside a word stays."""
    return re.split(r"(?:^|\s)#", line, maxsplit=1)[0]


def _commands_in(text: str) -> list[str]:
    """`tandem ...` commands in one shell line: split at && ; and a spaced pipe, env assignments skipped."""
    found = []
    for part in re.split(r"&&|;|\s\|\s|\s\|\|\s", text):
        words = part.strip().lstrip("$").split()
        while words and (ENV.match(words[0]) or words[0] in ("time", "sudo", "exec", "(")):
            words = words[1:]
        if len(words) >= 1 and words[0] == "tandem":
            found.append(" ".join(words).rstrip("&) ").strip())
    return found


def _spans(prose: list[tuple[int, str]]) -> list[tuple[int, str]]:
    """Inline code spans of one paragraph (a span may wrap lines) that start with `tandem`."""
    out: list[tuple[int, str]] = []
    text = "\n".join(line for _, line in prose).replace("\\|", "|")  # `a\|b` in a table cell
    for m in SPAN.finditer(text):
        words = m.group(1).split()
        while words and ENV.match(words[0]):
            words = words[1:]
        if words and words[0] == "tandem":
            out += [(prose[0][0] + text.count("\n", 0, m.start()), c) for c in _commands_in(" ".join(words))]
    return out


def extract(markdown: str) -> list[tuple[int, str]]:
    """(line number, command) for every `tandem` command in a markdown text: fenced and indented code blocks
    (continuations joined, comments dropped) and inline code spans."""
    out: list[tuple[int, str]] = []
    fenced = indented = False
    pending, start, prose, blank = "", 0, [], True
    for no, line in enumerate(markdown.splitlines() + [""], 1):
        if FENCE.match(line):
            fenced, pending = not fenced, ""
            out += _spans(prose) if prose else []
            prose = []
            continue
        indented = not fenced and (line.startswith("    ") or line.startswith("\t")) and (blank or indented)
        blank = not line.strip()
        if fenced or indented:
            body = _strip_comment(line).rstrip()
            if not pending:
                start = no
            if body.endswith("\\"):
                pending += body[:-1] + " "
                continue
            out += [(start, c) for c in _commands_in(pending + body)]
            pending = ""
        elif blank:
            out += _spans(prose) if prose else []
            prose = []
        else:
            prose.append((no, line))
    return out


def _words(command: str) -> list[str]:
    try:
        words = shlex.split(command)
    except ValueError:  # an unbalanced quote in prose: fall back to blanks
        words = command.split()
    words = [w.strip("[]") for w in words[1:]]
    return [w for w in words if w and w not in ("...", "…") and not w.endswith("...")]


def _options(cmd: Any) -> dict[str, Any]:
    """Option name -> click parameter (None for --help), hidden ones included."""
    names: dict[str, Any] = {"--help": None}
    for p in cmd.params:
        for name in (*p.opts, *p.secondary_opts):
            if name.startswith("-"):
                names[name] = p
    return names


def _takes_value(param: Any) -> bool:
    return param is not None and param.param_type_name == "option" and not (param.is_flag or param.count)


def check(command: str) -> list[str]:
    """Problems with one documented command: unknown verbs and unknown options ([] = it resolves)."""
    root = typer.main.get_command(app)
    return _check(root, _words(command), "tandem")


def _check(cmd: Any, words: list[str], path: str) -> list[str]:
    group = getattr(cmd, "commands", None)  # typer ships its own click: go by shape, not by class
    if group is not None and words and not words[0].startswith("-"):
        problems = []
        for verb in words[0].split("|"):
            sub = cmd.commands.get(verb)
            if sub is None:
                problems.append(f"`{path} {verb}`: no such verb (have: {', '.join(sorted(cmd.commands))})")
            else:
                problems += _check(sub, words[1:], f"{path} {verb}")
        return problems
    known, problems, i = _options(cmd), [], 0
    while i < len(words):
        word = words[i]
        i += 1
        if not word.startswith("-") or word == "-" or word == "--" or NUMBER.match(word):
            continue
        name = word.split("=", 1)[0]
        names = [name] if name.startswith("--") or len(name) == 2 else [f"-{c}" for c in name[1:]]  # -abc bundles
        for n in names:
            if n not in known:
                problems.append(f"`{path}`: no option {n}")
            elif _takes_value(known[n]) and "=" not in word:
                param = known[n]
                i += max(param.nargs, 1)  # its value, whatever it is (placeholders included)
    if not problems and group is None:
        try:
            cmd.make_context(path, [w for w in words if w != "--help"], resilient_parsing=True)
        except Exception as exc:  # click's UsageError family
            message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
            problems.append(f"`{path}`: {message}")
    return problems


def documented() -> list[tuple[str, int, str]]:
    return [(str(f.relative_to(ROOT)), no, c) for f in doc_files() for no, c in extract(f.read_text())]


def test_docs_show_tandem_commands() -> None:
    cmds = documented()
    assert len(cmds) > 50, "the extractor found too few commands: is it broken?"
    assert any(c.startswith("tandem bench dlm") for _, _, c in cmds)


def test_every_documented_command_resolves() -> None:
    problems = [f"{f}:{no}: {p}" for f, no, c in documented() for p in check(c)]
    assert not problems, "docs cite commands that do not exist:\n" + "\n".join(problems)


@pytest.mark.parametrize("command, needle", [
    ("tandem bench kv --frobnicate 3", "no option --frobnicate"),
    ("tandem bench cluster --quick", "no such verb"),
    ("tandem profile", "no such verb"),
    ("tandem bench kv|nosuch --json x.json", "`tandem bench nosuch`: no such verb"),
    ("tandem sim run LAYOUT --rate 4 --bogus", "no option --bogus"),
    ("tandem serve prefill -z", "no option -z"),
])
def test_made_up_verbs_and_flags_are_reported(command: str, needle: str) -> None:
    problems = check(command)
    assert any(needle in p for p in problems), problems


def test_extraction_handles_continuations_spans_and_placeholders() -> None:
    text = "\n".join([
        "Run `tandem up LAYOUT` or `PYTHONPATH=$PWD tandem generate \"hi\"`; `tandem/v1` is a package.",
        "```bash",
        "tandem bench dlm --quick \\",
        "    --json out.json   # a comment with tandem nosuch",
        "tandem sim run examples/x.yaml [--rate R] ... && tandem bench kv|fusion",
        "```",
    ])
    cmds = [c for _, c in extract(text)]
    assert cmds == ["tandem up LAYOUT", 'tandem generate "hi"', "tandem bench dlm --quick --json out.json",
                    "tandem sim run examples/x.yaml [--rate R] ...", "tandem bench kv|fusion"]
    assert all(check(c) == [] for c in cmds)
    assert check("tandem bench dlm --quick --jsonx out.json")
