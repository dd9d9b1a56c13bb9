"""Gateway text handling: UTF-8 safe deltas whose concatenation is the full decode, stop strings held back."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.gateway.textstream import TextStream


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory):
    from kit.checkpoints import write_tokenizer

    from services.engine.tokenizer import Tokenizer

    d: Path = tmp_path_factory.mktemp("tok")
    write_tokenizer(d, 384)
    return Tokenizer.from_dir(d)


TEXT = "Hello world, hello there! Unicode: café, 日本語 🙂 and the capital of France is Paris."


def run(tok, text: str, stop: tuple[str, ...]) -> tuple[list[str], TextStream]:
    ts = TextStream(tok, stop)
    deltas = [ts.push(t) for t in tok.encode(text)]
    deltas.append(ts.finish())
    return deltas, ts


def test_deltas_concatenate_to_the_full_decode(tok) -> None:
    deltas, ts = run(tok, TEXT, ())
    assert "".join(deltas) == tok.decode(tok.encode(TEXT), skip_special_tokens=True) == TEXT
    assert not ts.stopped and all("\ufffd" not in d for d in deltas)


@pytest.mark.parametrize("stop", [("hello",), ("Paris",), ("日本",), ("🙂",), ("zzz", "capital")])
def test_stop_string_cuts_and_never_leaks(tok, stop: tuple[str, ...]) -> None:
    deltas, ts = run(tok, TEXT, stop)
    cut = min(TEXT.index(s) for s in stop if s in TEXT)
    assert "".join(deltas) == TEXT[:cut] and ts.stopped
    emitted = ""
    for d in deltas:  # at no point did a released prefix contain (the whole of) a stop string
        emitted += d
        assert not any(s in emitted for s in stop)


def test_a_partial_stop_at_the_end_is_released_on_finish(tok) -> None:
    deltas, ts = run(tok, "Hello wor", ("world",))
    assert deltas[-1].endswith("wor") and "".join(deltas) == "Hello wor" and not ts.stopped
