"""The runner: owns a model and its device; prefill and batched decode steps over caller-owned KV."""

from __future__ import annotations

import hashlib
from typing import Any

import torch

from services.contracts.errors import InvalidArgument
from services.engine.config import ModelConfig
from services.engine.kv import KVBuffer
from services.engine.model import Slots, Transformer


def model_fingerprint(model: Transformer) -> str:
    """A short id of architecture + weights, so a KV cache is never installed into a different model."""
    h = hashlib.sha256(repr(model.cfg).encode())
    for name, p in sorted(model.state_dict().items()):
        flat = p.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 64)][:64].float().cpu().numpy().tobytes()
        h.update(name.encode() + str(tuple(p.shape)).encode() + sample)
    return h.hexdigest()[:16]


class Engine:
    """One model on one device. `tokenizer` is optional (token-id-only use in tests and benchmarks).

    `graphs`: decode dense batches through CUDA graphs of the fused step (services.engine.graphs). None means
    on CUDA when Triton is importable; the CPU path is always eager."""

    def __init__(self, model: Transformer, tokenizer: Any = None, *, name: str = "model",
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 graphs: bool | None = None) -> None:
        inv_freq = model.inv_freq.float().clone()
        self.model = model.to(device=device, dtype=dtype).eval()
        # .to(dtype) casts buffers too; rotary frequencies must stay float32 or long contexts lose their positions.
        self.model.inv_freq = inv_freq.to(self.model.inv_freq.device)
        if self.model.inv_freq.device.type == "cuda":
            # cuDNN's SDPA re-plans for every new key length (a decode step adds one), costing ~4 ms of CPU
            # per layer per step; the flash/efficient kernels need no plan (benchmarks/gpu_step_probe.py).
            torch.backends.cuda.enable_cudnn_sdp(False)
        self.tokenizer = tokenizer
        self.name = name
        self.device = torch.device(device)
        self.dtype = dtype
        self.fingerprint = model_fingerprint(self.model)
        self.graphs = None
        if graphs is None:
            from importlib.util import find_spec

            graphs = self.device.type == "cuda" and find_spec("triton") is not None
        if graphs:
            if self.device.type != "cuda":
                raise InvalidArgument("CUDA graphs need a CUDA device", param="device")
            from services.engine.graphs import DecodeGraphs

            self.graphs = DecodeGraphs(self.model)

    @property
    def cfg(self) -> ModelConfig:
        return self.model.cfg

    def new_kv(self, slots: int = 1, capacity: int | None = None) -> KVBuffer:
        return KVBuffer(self.cfg, slots, capacity or self.cfg.max_seq_len, self.device, self.dtype)

    def check_prompt(self, ids: list[int], max_new_tokens: int = 0) -> None:
        if not ids:
            raise InvalidArgument("prompt is empty", param="prompt")
        if len(ids) + max_new_tokens > self.cfg.max_seq_len:
            raise InvalidArgument(f"prompt of {len(ids)} tokens + max_tokens {max_new_tokens} exceeds the context "
                                  f"length {self.cfg.max_seq_len}", param="prompt")
        bad = [t for t in ids if not 0 <= t < self.cfg.vocab_size]
        if bad:
            raise InvalidArgument(f"token id {bad[0]} outside the vocabulary (size {self.cfg.vocab_size})", param="prompt")

    @torch.inference_mode()
    def prefill(self, prompts: list[list[int]], kv: KVBuffer, slots: list[int]) -> torch.Tensor:
        """Run prompts (any lengths) into their slots from position 0; float32 logits of each last token [B, V]."""
        for ids in prompts:
            self.check_prompt(ids)
        lens = [len(p) for p in prompts]
        T = max(lens)
        tokens = torch.zeros(len(prompts), T, dtype=torch.long)
        for i, ids in enumerate(prompts):
            tokens[i, : len(ids)] = torch.tensor(ids)
        if self.graphs is not None and kv.k.is_cuda and kv.dtype == self.dtype:
            return self.graphs.prefill(tokens.to(self.device), kv, slots, lens).float()
        logits = self.model(tokens.to(self.device), kv, torch.tensor(slots, device=self.device), [0] * len(prompts),
                            n_new=lens, logits_at=[n - 1 for n in lens])
        return logits.float()

    @torch.inference_mode()
    def decode(self, tokens: list[int], kv: KVBuffer, slots: Slots) -> torch.Tensor:
        """One step for every slot: append `tokens[b]` at the end of its slot; float32 logits [B, V]."""
        dense = isinstance(slots, slice) and not slots.start and slots.step in (None, 1) and slots.stop == len(tokens)
        if self.graphs is not None and dense and kv.k.is_cuda and kv.dtype == self.dtype:
            return self.graphs.decode(tokens, kv)
        ids = range(slots.start or 0, slots.stop) if isinstance(slots, slice) else slots.tolist()
        starts = [kv.lengths[s] for s in ids]
        t = torch.tensor(tokens, device=self.device, dtype=torch.long)[:, None]
        return self.model(t, kv, slots, starts, logits_at=[0] * len(tokens)).float()


def random_engine(cfg: ModelConfig, seed: int = 0, **kwargs: Any) -> Engine:
    """A model with random weights (benchmarks and tests that need shapes, not knowledge)."""
    torch.manual_seed(seed)
    model = Transformer(cfg)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.02) if p.dim() > 1 else None
    return Engine(model, name=kwargs.pop("name", "random"), **kwargs)
