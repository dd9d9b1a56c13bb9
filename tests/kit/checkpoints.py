"""Test fixtures: write tiny random Llama checkpoints (HF safetensors + config.json + tokenizer.json) to disk."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from services.engine.config import ModelConfig

SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")  # ids 0, 1, 2; <|im_end|> is EOS
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
_CORPUS = [
    "The capital of France is Paris. The capital of Italy is Rome. Hello world, hello there!",
    "Tandem splits prefill and decode onto separate workers and fuses every live request.",
    "def main():\n    return 42  # numbers 0123456789 and symbols {}[]()<>=+-*/",
    "Unicode: café, naïve, 日本語, emoji 🙂 — dashes and “quotes”.",
]


def tiny_config(**overrides: Any) -> ModelConfig:
    """A model small enough for unit tests (GQA by default: 4 query heads share 2 KV heads)."""
    base = ModelConfig(vocab_size=384, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=128, max_seq_len=256,
                       rope_theta=10000.0, norm_eps=1e-5, bos_id=None, eos_ids=(2,))
    return replace(base, **overrides)


def random_state(cfg: ModelConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights under our (HF minus `model.`) names, scaled so logits are far from uniform."""
    from services.engine.model import Transformer

    g = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in Transformer(cfg).state_dict().items()}
    state = {}
    for name, shape in sorted(shapes.items()):
        if cfg.tie_embeddings and name == "lm_head.weight":
            continue
        if name.endswith("norm.weight"):
            state[name] = 1.0 + 0.1 * torch.randn(shape, generator=g)
        elif len(shape) == 2:
            state[name] = torch.randn(shape, generator=g) * (0.5 if "embed" in name else shape[1] ** -0.5)
        else:  # biases
            state[name] = 0.1 * torch.randn(shape, generator=g)
    return state


def hf_config(cfg: ModelConfig) -> dict[str, Any]:
    out: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.dim, "intermediate_size": cfg.hidden_dim,
        "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim, "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta,
        "max_position_embeddings": cfg.max_seq_len, "tie_word_embeddings": cfg.tie_embeddings,
        "attention_bias": cfg.attention_bias, "mlp_bias": False, "torch_dtype": "float32",
        "bos_token_id": cfg.bos_id, "eos_token_id": list(cfg.eos_ids) if len(cfg.eos_ids) != 1 else cfg.eos_ids[0],
    }
    if cfg.rope_scaling:
        out["rope_scaling"] = dict(cfg.rope_scaling)
    return out


def write_tokenizer(path: Path, vocab_size: int) -> None:
    """A byte-level BPE trained on a small corpus, padded with <extra_i> so it covers exactly `vocab_size` ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIALS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    n = tok.get_vocab_size()
    if n > vocab_size:
        raise ValueError(f"vocab_size {vocab_size} is too small for a byte-level tokenizer ({n} needed)")
    tok.add_tokens([f"<extra_{i}>" for i in range(vocab_size - n)])
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": None, "eos_token": "<|im_end|>", "chat_template": CHATML,
        "tokenizer_class": "PreTrainedTokenizerFast"}, indent=1))


def write_tiny_checkpoint(path: str | Path, cfg: ModelConfig | None = None, *, seed: int = 0, shards: int = 1,
                          dtype: torch.dtype = torch.float32, tokenizer: bool = True) -> Path:
    """Write a HF Llama directory (config.json, safetensors in `shards` files, tokenizer) and return its path."""
    from safetensors.torch import save_file

    cfg = cfg or tiny_config()
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {f"model.{k}" if k != "lm_head.weight" else k: v.to(dtype).contiguous()
             for k, v in random_state(cfg, seed).items()}
    conf = hf_config(cfg)
    conf["torch_dtype"] = str(dtype).removeprefix("torch.")
    (path / "config.json").write_text(json.dumps(conf, indent=1))
    names = sorted(state)
    if shards <= 1:
        save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i in range(shards):
            fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            part = {k: state[k] for k in names[i::shards]}
            save_file(part, str(path / fname), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(part, fname))
        (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    if tokenizer:
        write_tokenizer(path, cfg.vocab_size)
    return path


def write_tiny_gguf(path: str | Path, cfg: ModelConfig | None = None, *, seed: int = 0, qtype: str = "F32",
                    pre: str = "default") -> Path:
    """The same random model as `write_tiny_checkpoint(cfg, seed)`, written the way llama.cpp converts it:
    GGUF names, Q/K rows permuted, llama3 rope scaling as a `rope_freqs` tensor, 2-D weights in `qtype`
    (F32 or Q8_0), and the byte-level BPE tokenizer as metadata."""
    import tempfile

    import gguf
    import numpy as np

    from services.engine.gguf_file import _BLOCK, _GLOBAL, permute
    from services.engine.layers import rope_inv_freq

    cfg = cfg or tiny_config()
    path = Path(path)
    quant = gguf.GGMLQuantizationType[qtype]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-random-llama")
    w.add_block_count(cfg.n_layers)
    w.add_context_length(cfg.max_seq_len)
    w.add_embedding_length(cfg.dim)
    w.add_feed_forward_length(cfg.hidden_dim)
    w.add_head_count(cfg.n_heads)
    w.add_head_count_kv(cfg.n_kv_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    with tempfile.TemporaryDirectory() as tmp:
        write_tokenizer(Path(tmp), cfg.vocab_size)
        tj = json.loads((Path(tmp) / "tokenizer.json").read_text())
    added = {t["id"]: t["content"] for t in tj["added_tokens"]}
    vocab = {**tj["model"]["vocab"], **{c: i for i, c in added.items()}}
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types([3 if i in added else 1 for i in range(len(tokens))])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]])
    for e in cfg.eos_ids[:1]:
        w.add_eos_token_id(e)
    w.add_add_bos_token(False)
    w.add_chat_template(CHATML)
    names = {v: k for k, v in _GLOBAL.items()}
    for i in range(cfg.n_layers):
        for g, ours in _BLOCK.items():
            for kind in ("weight", "bias"):
                names[f"layers.{i}.{ours}.{kind}"] = f"blk.{i}.{g}.{kind}"
    for name, t in sorted(random_state(cfg, seed).items()):
        if name.endswith("q_proj.weight") or name.endswith("q_proj.bias"):
            t = permute(t, cfg.n_heads)
        elif name.endswith("k_proj.weight") or name.endswith("k_proj.bias"):
            t = permute(t, cfg.n_kv_heads)
        arr = t.numpy().astype(np.float32)
        if arr.ndim == 2 and quant != gguf.GGMLQuantizationType.F32:
            w.add_tensor(names[name], gguf.quants.quantize(arr, quant), raw_dtype=quant)
        else:
            w.add_tensor(names[name], arr)
    if cfg.rope_scaling and cfg.rope_scaling.get("rope_type") == "llama3":
        base = rope_inv_freq(cfg.head_dim, cfg.rope_theta)
        w.add_tensor("rope_freqs.weight", (base / rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling))
                     .numpy().astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run a block with `n` torch threads. Tests use 1: on a machine shared with other jobs, two OpenMP
    threads on two busy cores stall each other at every op and a small forward pass slows down ~10x."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
