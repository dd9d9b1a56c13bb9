"""GGUF loading on tiny files written like llama.cpp's converter: permuted Q/K, GQA, untied head, llama3 rope, Q8_0."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from kit.checkpoints import tiny_config, write_tiny_checkpoint, write_tiny_gguf

from services.contracts.errors import InvalidArgument
from services.engine import load_engine

transformers = pytest.importorskip("transformers")


LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 32}


def reference_logits(hf_dir: Path, ids: list[int]) -> torch.Tensor:
    model = transformers.LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0, -1]


@pytest.mark.parametrize("cfg", [tiny_config(rope_scaling=LLAMA3), tiny_config(n_kv_heads=1, tie_embeddings=True)],
                         ids=["gqa-untied-llama3", "mqa-tied"])
def test_f32_gguf_matches_transformers_on_the_same_weights(tmp_path: Path, cfg) -> None:
    gguf_file = write_tiny_gguf(tmp_path / "m.gguf", cfg, seed=5)
    hf_dir = write_tiny_checkpoint(tmp_path / "hf", cfg, seed=5)
    engine = load_engine(gguf_file, device="cpu")
    assert engine.cfg.tie_embeddings == cfg.tie_embeddings and engine.cfg.n_kv_heads == cfg.n_kv_heads
    ids = list(range(3, 103))  # 100 positions, beyond llama3's original context of 32
    got = engine.prefill([ids], engine.new_kv(1, len(ids)), [0])[0]
    torch.testing.assert_close(got, reference_logits(hf_dir, ids), atol=1e-4, rtol=1e-4)


def test_q8_0_gguf_dequantizes_close_to_f32(tmp_path: Path) -> None:
    cfg = tiny_config()
    f32 = load_engine(write_tiny_gguf(tmp_path / "f32.gguf", cfg, seed=1), device="cpu")
    q8 = load_engine(write_tiny_gguf(tmp_path / "q8.gguf", cfg, seed=1, qtype="Q8_0"), device="cpu")
    assert f32.cfg == q8.cfg
    ids = list(range(3, 40))
    a = f32.prefill([ids], f32.new_kv(1, 40), [0])[0]
    b = q8.prefill([ids], q8.new_kv(1, 40), [0])[0]
    assert not torch.equal(a, b)  # the quantized weights really differ...
    assert torch.nn.functional.cosine_similarity(a, b, dim=0) > 0.999  # ...but only by Q8_0's rounding


def test_gguf_tokenizer_equals_tokenizer_json(tmp_path: Path) -> None:
    cfg = tiny_config()
    from_gguf = load_engine(write_tiny_gguf(tmp_path / "m.gguf", cfg), device="cpu").tokenizer
    from_json = load_engine(write_tiny_checkpoint(tmp_path / "hf", cfg), device="cpu").tokenizer
    for text in ["Hello world", "café 日本語 🙂", "  spaces\n\ttabs", "<|im_start|>user\nHi<|im_end|>"]:
        assert from_gguf.encode(text) == from_json.encode(text)
        assert from_gguf.decode(from_gguf.encode(text)) == text
    assert from_gguf.eos_ids == (2,)
    msgs = [{"role": "user", "content": "Hi"}]
    assert from_gguf.apply_chat_template(msgs) == from_json.apply_chat_template(msgs)


@pytest.mark.parametrize("pre,pieces", [
    ("default", ["12345", "Ġapples", "'re"]),          # GPT-2 split
    ("smollm", ["1", "2", "3", "4", "5", "Ġapples", "'re"]),  # llama.cpp's smollm: single digits
    ("llama-bpe", ["123", "45", "Ġapples", "'re"]),     # Llama 3: digits in groups of up to three
])
def test_gguf_pre_tokenizer_follows_llama_cpp_names(tmp_path: Path, pre: str, pieces: list[str]) -> None:
    tok = load_engine(write_tiny_gguf(tmp_path / "m.gguf", pre=pre), device="cpu").tokenizer
    assert [p for p, _ in tok.backend.pre_tokenizer.pre_tokenize_str("12345 apples're")] == pieces
    assert tok.decode(tok.encode("12345 apples're")) == "12345 apples're"


def test_unsupported_gguf_architecture_and_tokenizer(tmp_path: Path) -> None:
    import gguf

    def write(name: str, arch: str, tok_model: str) -> Path:
        w = gguf.GGUFWriter(str(tmp_path / name), arch)
        w.add_tokenizer_model(tok_model)
        w.add_token_list(["a", "b"])
        w.add_block_count(1)
        w.add_embedding_length(8)
        w.add_feed_forward_length(16)
        w.add_head_count(2)
        w.add_context_length(16)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        return tmp_path / name

    with pytest.raises(InvalidArgument, match="architecture 'gpt2' is not supported"):
        load_engine(write("a.gguf", "gpt2", "gpt2"), device="cpu")
    with pytest.raises(InvalidArgument, match="tokenizer model 'llama' is not supported"):
        load_engine(write("b.gguf", "llama", "llama"), device="cpu")
