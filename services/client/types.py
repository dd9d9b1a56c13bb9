"""What the client sends and gets back: typed results, connection options, and the request builder."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from services.rpc.tandem.v1 import generation_pb2 as pb

DEFAULT_TARGET = "127.0.0.1:50051"
_FINISH = {pb.FINISH_REASON_STOP: "stop", pb.FINISH_REASON_LENGTH: "length"}
Message = dict[str, str] | tuple[str, str]  # {"role": ..., "content": ...} or (role, content)


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


@dataclass(frozen=True, slots=True)
class Delta:
    """One streamed message: the text and token ids it adds; the last one has finish_reason, usage, timings."""

    text: str
    token_ids: tuple[int, ...]
    request_id: str
    finish_reason: str | None = None  # "stop" or "length" on the last delta
    usage: Usage | None = None
    timings: dict[str, Any] | None = None  # tandem.v1.Timings as a dict (seconds; token_times_s a list)
    workers: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Completion:
    """A whole answer (what `generate` returns)."""

    text: str
    token_ids: tuple[int, ...]
    finish_reason: str
    usage: Usage
    timings: dict[str, Any]
    request_id: str
    workers: tuple[str, ...] = ()

    @classmethod
    def of(cls, deltas: Sequence[Delta]) -> Completion:
        last = deltas[-1]
        ids = tuple(i for d in deltas for i in d.token_ids)
        return cls("".join(d.text for d in deltas), ids, last.finish_reason or "", last.usage or Usage(0, 0, 0),
                   last.timings or {}, last.request_id, last.workers)


@dataclass(frozen=True, slots=True)
class Retry:
    """Retries of a call that failed with UNAVAILABLE before its first token (never after: no duplicate text)."""

    attempts: int = 3  # total tries, the first included
    backoff_s: float = 0.2  # doubled after each failure
    max_backoff_s: float = 2.0


@dataclass(frozen=True, slots=True)
class TLS:
    """Server-authenticated TLS (root_certificates) and, for mTLS, this client's certificate and key (PEM files)."""

    root_certificates: str | Path | None = None  # None = the system roots
    certificate_chain: str | Path | None = None
    private_key: str | Path | None = None
    server_name: str | None = None  # override the name checked against the server's certificate

    def credentials(self) -> grpc.ChannelCredentials:
        def read(p: str | Path | None) -> bytes | None:
            return Path(p).read_bytes() if p else None

        return grpc.ssl_channel_credentials(read(self.root_certificates), read(self.private_key),
                                            read(self.certificate_chain))


@dataclass(slots=True)
class Sampling:
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int = 0
    seed: int | None = None
    stop: Sequence[str] = field(default_factory=tuple)
    ignore_eos: bool = False

    def to_pb(self) -> pb.SamplingOptions:
        s = pb.SamplingOptions(top_k=self.top_k, stop=list(self.stop), ignore_eos=self.ignore_eos)
        for name in ("max_tokens", "temperature", "top_p", "seed"):
            value = getattr(self, name)
            if value is not None:
                setattr(s, name, value)
        return s


def build_request(prompt: str | Sequence[int] | None, messages: Iterable[Message] | None, sampling: Sampling,
                  model: str = "", timeout_s: float = 0.0) -> pb.GenerateRequest:
    """A GenerateRequest with exactly one input: text, token ids, or chat messages."""
    if (prompt is None) == (messages is None):
        raise ValueError("pass exactly one of prompt (text or token ids) and messages")
    req = pb.GenerateRequest(model=model, sampling=sampling.to_pb(), timeout_s=timeout_s)
    if messages is not None:
        for m in messages:
            role, content = (m["role"], m["content"]) if isinstance(m, dict) else m
            req.chat.messages.add(role=role, content=content)
        if not req.HasField("chat"):
            req.chat.SetInParent()
    elif isinstance(prompt, str):
        req.text = prompt
    else:
        req.token_ids.ids.extend(prompt)
    return req


def to_delta(msg: pb.GenerateResponse) -> Delta:
    last = msg.finish_reason != pb.FINISH_REASON_UNSPECIFIED
    timings = None
    if last:
        t = msg.timings
        timings = {f.name: (list(v) if f.name == "token_times_s" else v) for f, v in t.ListFields()}
        for f in t.DESCRIPTOR.fields:
            timings.setdefault(f.name, [] if f.name == "token_times_s" else 0)
    usage = Usage(msg.usage.prompt_tokens, msg.usage.completion_tokens, msg.usage.total_tokens) if last else None
    return Delta(msg.text, tuple(msg.token_ids), msg.request_id, _FINISH.get(msg.finish_reason) if last else None,
                 usage, timings, tuple(msg.workers))


def metadata(api_key: str | None, request_id: str | None) -> tuple[tuple[str, str], ...]:
    md: list[tuple[str, str]] = []
    if api_key:
        md.append(("authorization", f"Bearer {api_key}"))
    if request_id:
        md.append(("x-request-id", request_id))
    return tuple(md)
