"""Validated OpenAI bodies (services.gateway.schema) -> GenRequest, and Chunks -> OpenAI response JSON."""

from __future__ import annotations

import time
from typing import Any, Literal

from services.contracts.errors import InvalidArgument, NotFound
from services.engine.sampling import SamplingParams
from services.gateway.core import Chunk, Gateway, GenRequest
from services.gateway.schema import MAX_STOP, ChatBody, CompletionBody, parse

__all__ = ["MAX_STOP", "ChatBody", "CompletionBody", "parse", "check_model", "to_request", "Shaper", "error_body"]

CHAT_DEFAULT_MAX_TOKENS = 1024  # chat requests without max_tokens get this, capped by the context left


def check_model(gw: Gateway, name: str, missing: type[InvalidArgument] | type[NotFound] = InvalidArgument) -> None:
    """Raise `missing` (model_not_found) unless this gateway serves `name` ("" = the cluster's model)."""
    if name and name != gw.model_name:
        dlm = getattr(gw, "dlm", None)
        if dlm is not None and dlm.serves(name):
            raise InvalidArgument(f"model: {name} supports HTTP /v1/completions only", param="model")
        served = repr(gw.model_name) + (f" and {dlm.model_name!r} (/v1/completions)" if dlm is not None else "")
        err = missing(f"model: unknown model {name!r}; this gateway serves {served}", param="model")
        err.openai_code = "model_not_found"  # type: ignore[attr-defined]
        raise err


def to_request(gw: Gateway, body: CompletionBody | ChatBody, request_id: str, timeout_s: float,
               received: float) -> GenRequest:
    """Tokenize and validate (blocking: may ask workers for the context length)."""
    check_model(gw, body.model)
    if isinstance(body, ChatBody):
        param = "messages"
        ids = gw.tokenizer.encode_chat([{"role": m.role, "content": m.text()} for m in body.messages])
        max_tokens = body.max_completion_tokens or body.max_tokens
        if max_tokens is None:
            max_tokens = max(1, min(CHAT_DEFAULT_MAX_TOKENS, gw.context_length() - len(ids)))
    else:
        param = "prompt"
        ids = _prompt_ids(gw, body.prompt)
        max_tokens = body.max_tokens or 16  # the OpenAI default for completions
    params = SamplingParams(max_tokens=max_tokens, temperature=body.temperature, top_k=body.top_k, top_p=body.top_p,
                            seed=body.seed, stop=tuple(body.stop or ()), ignore_eos=body.ignore_eos)
    gw.check(ids, params, prompt_param=param)
    api = "chat" if isinstance(body, ChatBody) else "completions"
    return GenRequest(ids, params, request_id=request_id, timeout_s=timeout_s, api=api, received=received)


def _prompt_ids(gw: Gateway, prompt: Any) -> list[int]:
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) != 1:
            raise InvalidArgument(f"prompt: batches of prompts are not supported (got {len(prompt)}); send one "
                                  "request per prompt", param="prompt")
        prompt = prompt[0]
    if isinstance(prompt, str):
        if not prompt:
            raise InvalidArgument("prompt: must not be empty", param="prompt")
        return gw.tokenizer.encode(prompt)
    return list(prompt)


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


class Shaper:
    """Builds the OpenAI JSON for one response (streamed chunks or the whole thing)."""

    def __init__(self, kind: Literal["completions", "chat"], model: str, request_id: str,
                 include_usage: bool = False) -> None:
        self.kind, self.model, self.include_usage = kind, model, include_usage
        self.id = ("cmpl-" if kind == "completions" else "chatcmpl-") + request_id
        self.created = int(time.time())

    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def stream_chunks(self, chunk: Chunk, first: bool) -> list[dict[str, Any]]:
        """The SSE payloads for one Chunk (chat opens with a role delta; usage goes last when asked)."""
        out: list[dict[str, Any]] = []
        if self.kind == "completions":
            doc = self._head("text_completion")
            doc["choices"] = [{"index": 0, "text": chunk.text, "logprobs": None, "finish_reason": chunk.finish_reason}]
            out.append(doc)
        else:
            if first:
                out.append(self._chat_chunk({"role": "assistant", "content": ""}, None))
            if chunk.text or chunk.finish_reason is None:
                out.append(self._chat_chunk({"content": chunk.text}, None))
            if chunk.finish_reason is not None:
                out.append(self._chat_chunk({}, chunk.finish_reason))
        if self.include_usage:
            for doc in out:
                doc["usage"] = None
        if chunk.finish_reason is not None:
            out[-1]["tandem_timings"] = chunk.timings
            if self.include_usage:
                usage = self._head(out[-1]["object"])
                usage.update(choices=[], usage=chunk.usage)
                out.append(usage)
        return out

    def _chat_chunk(self, delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
        doc = self._head("chat.completion.chunk")
        doc["choices"] = [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
        return doc

    def whole(self, chunks: list[Chunk]) -> dict[str, Any]:
        text = "".join(c.text for c in chunks)
        last = chunks[-1]
        if self.kind == "completions":
            doc = self._head("text_completion")
            doc["choices"] = [{"index": 0, "text": text, "logprobs": None, "finish_reason": last.finish_reason}]
        else:
            doc = self._head("chat.completion")
            doc["choices"] = [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                               "finish_reason": last.finish_reason}]
        doc["usage"] = last.usage
        doc["tandem_timings"] = last.timings
        return doc
