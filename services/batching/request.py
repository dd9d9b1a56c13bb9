"""What the decode scheduler receives: a request whose prompt KV is computed, and how much KV it reserves."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from services.contracts.errors import InvalidArgument
from services.engine.config import ModelConfig
from services.engine.sampling import SamplingParams

NO_TOKEN = -1  # token id passed to emit() when a stream ends without a new token (cancel, error, nothing left)
FINISH_REASONS = ("stop", "length", "cancelled", "error")


@dataclass(slots=True, eq=False)
class DecodeRequest:
    """One request for the decode phase (see .helpers/SPLITWISE_CONTRACT.md)."""

    request_id: str
    prompt_kv: list[tuple[torch.Tensor, torch.Tensor]]  # per layer K, V [n_tokens, n_kv_heads, head_dim]
    first_token: int  # sampled by prefill, not yet in the KV
    params: SamplingParams  # max_tokens counts first_token too
    emit: Callable[[int, str | None], None]  # emit(token_id, finish_reason); reason set on the last call

    @property
    def prompt_len(self) -> int:
        return int(self.prompt_kv[0][0].shape[0]) if self.prompt_kv else 0


def reserved_tokens(prompt_len: int, max_tokens: int, max_seq_len: int) -> int:
    """The reservation policy: the most KV tokens the request can ever hold.

    The prompt, then every generated token except the last one sampled (which is emitted, never fed back):
    prompt_len + max_tokens - 1, capped by the model's context length (the request ends there with "length").
    """
    return min(prompt_len + max_tokens - 1, max_seq_len)


def validate_request(req: DecodeRequest, cfg: ModelConfig, dtype: torch.dtype) -> None:
    """Cheap edge checks so a bad request fails in submit(), never inside the scheduler loop."""
    if not isinstance(req.request_id, str) or not req.request_id:
        raise InvalidArgument("request_id must be a non-empty string", param="request_id")
    req.params.validate()
    if not callable(req.emit):
        raise InvalidArgument("emit must be callable", param="emit")
    if not 0 <= req.first_token < cfg.vocab_size:
        raise InvalidArgument(f"first_token {req.first_token} outside the vocabulary (size {cfg.vocab_size})",
                              param="first_token")
    if len(req.prompt_kv) != cfg.n_layers:
        raise InvalidArgument(f"prompt_kv has {len(req.prompt_kv)} layers, the model has {cfg.n_layers}",
                              param="prompt_kv")
    n = req.prompt_len
    want = (n, cfg.n_kv_heads, cfg.head_dim)
    for i, (k, v) in enumerate(req.prompt_kv):
        for name, t in (("k", k), ("v", v)):
            if tuple(t.shape) != want:
                raise InvalidArgument(f"prompt_kv layer {i} {name}: shape {tuple(t.shape)}, expected {want}",
                                      param="prompt_kv")
            if t.dtype != dtype:
                raise InvalidArgument(f"prompt_kv layer {i} {name}: dtype {t.dtype}, expected {dtype}",
                                      param="prompt_kv")
    if n < 1:
        raise InvalidArgument("prompt_kv is empty (a prompt has at least one token)", param="prompt_kv")
    if n >= cfg.max_seq_len:
        raise InvalidArgument(f"prompt of {n} tokens leaves no room in the context length {cfg.max_seq_len}",
                              param="prompt_kv")
