"""Read a Hugging Face Llama directory: config.json, (sharded) *.safetensors, tokenizer.json."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from services.contracts.errors import InvalidArgument, NotFound
from services.engine.config import ModelConfig
from services.engine.tokenizer import Tokenizer


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    """Map a transformers LlamaConfig dict (v4 `rope_scaling` or v5 `rope_parameters` style) to ModelConfig."""
    from services.engine.loader import SUPPORTED_HF

    kind = hf.get("model_type")
    if kind not in SUPPORTED_HF:
        archs = hf.get("architectures") or []
        raise InvalidArgument(f"architecture {kind or archs!r} is not supported (supported: {sorted(SUPPORTED_HF)})",
                              param="model")
    if hf.get("hidden_act", "silu") != "silu" or hf.get("mlp_bias"):
        raise InvalidArgument("only SwiGLU MLPs without bias (hidden_act=silu) are supported", param="model")
    try:
        n_heads = int(hf["num_attention_heads"])
        rope = hf.get("rope_parameters") or {}
        scaling = hf.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
        eos = hf.get("eos_token_id")
        return ModelConfig(
            vocab_size=int(hf["vocab_size"]), dim=int(hf["hidden_size"]), n_layers=int(hf["num_hidden_layers"]),
            n_heads=n_heads, n_kv_heads=int(hf.get("num_key_value_heads") or n_heads),
            hidden_dim=int(hf["intermediate_size"]), head_dim=int(hf.get("head_dim") or 0),
            norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=float(hf.get("rope_theta", rope.get("rope_theta", 10000.0))),
            rope_scaling=dict(scaling) if scaling else None,
            max_seq_len=int(hf.get("max_position_embeddings", 2048)),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attention_bias=bool(hf.get("attention_bias", False)),
            bos_id=hf.get("bos_token_id"),
            eos_ids=tuple(eos if isinstance(eos, list) else [eos] if isinstance(eos, int) else []),
        )
    except KeyError as exc:
        raise InvalidArgument(f"config.json lacks {exc.args[0]!r}", param="model") from None
    except (TypeError, ValueError) as exc:
        raise InvalidArgument(f"config.json is invalid: {exc}", param="model") from None


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of the directory (one file or shards listed by the index), `model.` prefix stripped."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from services.engine.loader import read_json

    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index).get("weight_map") or {}
        files = sorted({path / f for f in weight_map.values()})
    else:
        files = sorted(path.glob("*.safetensors"))
    if not files:
        raise NotFound(f"no *.safetensors files in {path}", param="model")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        if not f.is_file():
            raise NotFound(f"shard {f.name} listed in the index is missing", param="model")
        try:
            tensors = load_file(str(f))
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise InvalidArgument(f"{f.name} is not a readable safetensors file: {exc}", param="model") from None
        for name, t in tensors.items():
            if name.endswith("rotary_emb.inv_freq"):  # recomputed from the config
                continue
            state[name.removeprefix("model.")] = t
    return state


def read_hf(path: Path) -> tuple[ModelConfig, dict[str, torch.Tensor], Tokenizer | None, str]:
    from services.engine.loader import read_json

    if not (path / "config.json").is_file():
        raise NotFound(f"{path} has no config.json (expected a Hugging Face model directory)", param="model")
    hf = read_json(path / "config.json")
    cfg = config_from_hf(hf)
    tokenizer = Tokenizer.from_dir(path) if (path / "tokenizer.json").is_file() else None
    if tokenizer is not None and tokenizer.eos_ids:
        from dataclasses import replace

        cfg = replace(cfg, eos_ids=tuple(dict.fromkeys(cfg.eos_ids + tokenizer.eos_ids)))
    return cfg, read_safetensors(path), tokenizer, hf.get("_name_or_path") or path.name
