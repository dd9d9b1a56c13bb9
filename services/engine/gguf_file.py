"""Read a llama.cpp GGUF file: hyperparameters, dequantized tensors (Q/K permutation undone), tokenizer."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from services.contracts.errors import InvalidArgument
from services.engine.config import ModelConfig
from services.engine.tokenizer import Tokenizer

# GGUF tensor names -> our (HF Llama) parameter names
_GLOBAL = {"token_embd.weight": "embed_tokens.weight", "output_norm.weight": "norm.weight",
           "output.weight": "lm_head.weight"}
_BLOCK = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
          "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
          "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


def unpermute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's conversion, which interleaves the two rotary halves of every Q/K head's rows."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def permute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """llama.cpp's conversion (the inverse of `unpermute`); used to write GGUF test fixtures."""
    rows = w.shape[0]
    return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def read_fields(reader: Any) -> dict[str, Any]:
    out = {}
    for key, field in reader.fields.items():
        try:
            out[key] = field.contents()
        except Exception:  # an exotic value type we never read; keep going
            continue
    return out


def config_from_gguf(f: dict[str, Any], n_vocab: int) -> ModelConfig:
    from services.engine.loader import SUPPORTED_GGUF

    arch = f.get("general.architecture")
    if arch not in SUPPORTED_GGUF:
        raise InvalidArgument(f"GGUF architecture {arch!r} is not supported (supported: {sorted(SUPPORTED_GGUF)})",
                              param="model")

    def get(key: str, default: Any = None) -> Any:
        value = f.get(f"{arch}.{key}", default)
        if value is None:
            raise InvalidArgument(f"GGUF metadata lacks {arch}.{key}", param="model")
        return value

    n_heads, dim = int(get("attention.head_count")), int(get("embedding_length"))
    head_dim = int(f.get(f"{arch}.attention.key_length", dim // n_heads))
    if int(f.get(f"{arch}.rope.dimension_count", head_dim)) != head_dim:
        raise InvalidArgument("partial rotary embeddings are not supported", param="model")
    scaling = None
    kind = f.get(f"{arch}.rope.scaling.type")
    if kind == "linear":
        scaling = {"rope_type": "linear", "factor": float(get("rope.scaling.factor"))}
    elif kind not in (None, "none"):
        raise InvalidArgument(f"GGUF rope scaling {kind!r} is not supported (none, linear, llama3 via rope_freqs)",
                              param="model")
    eos = [f[k] for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id") if k in f]
    return ModelConfig(
        vocab_size=int(f.get(f"{arch}.vocab_size", n_vocab)), dim=dim, n_layers=int(get("block_count")),
        n_heads=n_heads, n_kv_heads=int(f.get(f"{arch}.attention.head_count_kv", n_heads)),
        hidden_dim=int(get("feed_forward_length")), head_dim=head_dim,
        norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)), rope_theta=float(get("rope.freq_base", 10000.0)),
        rope_scaling=scaling, max_seq_len=int(get("context_length", 2048)),
        bos_id=f.get("tokenizer.ggml.bos_token_id"), eos_ids=tuple(dict.fromkeys(int(e) for e in eos)),
    )


def read_gguf(path: Path) -> tuple[ModelConfig, dict[str, torch.Tensor], Tokenizer, str, torch.Tensor | None]:
    """Config, our-named float32 tensors, tokenizer, display name, and llama3-style rope frequencies if present."""
    from dataclasses import replace

    from gguf import GGUFReader
    from gguf.quants import dequantize

    try:
        reader = GGUFReader(str(path))
    except Exception as exc:  # the reader raises assorted ValueError/struct/mmap errors on bad files
        raise InvalidArgument(f"{path.name} is not a readable GGUF file: {exc}", param="model") from None
    fields = read_fields(reader)
    tokens = fields.get("tokenizer.ggml.tokens")
    cfg = config_from_gguf(fields, len(tokens) if tokens else 0)
    tokenizer = Tokenizer.from_gguf(fields) if tokens else None
    if tokenizer is None:
        raise InvalidArgument(f"{path.name} carries no tokenizer metadata", param="model")
    state: dict[str, torch.Tensor] = {}
    inv_freq = None
    for t in reader.tensors:
        try:
            arr = dequantize(t.data, t.tensor_type)
        except (NotImplementedError, ValueError) as exc:
            raise InvalidArgument(f"tensor {t.name}: cannot dequantize {t.tensor_type.name}: {exc}",
                                  param="model") from None
        w = torch.from_numpy(np.array(arr, dtype=np.float32).reshape(tuple(reversed(t.shape.tolist()))))
        if t.name == "rope_freqs.weight":  # llama3 rope scaling: per-frequency divisors
            base = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float64) / cfg.head_dim))
            inv_freq = (base / w.double()).float()
            continue
        if t.name in _GLOBAL:
            state[_GLOBAL[t.name]] = w
            continue
        m = _BLOCK_RE.fullmatch(t.name)
        if not m or m.group(2) not in _BLOCK:
            raise InvalidArgument(f"unexpected GGUF tensor {t.name} for a Llama model", param="model")
        layer, part, kind = m.groups()
        if part == "attn_q":
            w = unpermute(w, cfg.n_heads)
        elif part == "attn_k":
            w = unpermute(w, cfg.n_kv_heads)
        state[f"layers.{layer}.{_BLOCK[part]}.{kind}"] = w
    if "lm_head.weight" not in state:
        cfg = replace(cfg, tie_embeddings=True)
    if any(k.endswith("q_proj.bias") for k in state):
        cfg = replace(cfg, attention_bias=True)
    name = str(fields.get("general.name") or path.stem)
    tokenizer.eos_ids = cfg.eos_ids
    return cfg, state, tokenizer, name, inv_freq
