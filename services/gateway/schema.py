"""The one request schema both front doors validate against (HTTP JSON and gRPC messages alike).

Strict: no silent coercion (`"4"` is not an integer, `"yes"` not a boolean), integers range-checked,
strings valid Unicode, nesting bounded, OpenAI fields we do not implement refused by name unless they ask
for the default behaviour, and unknown fields refused (the OpenAI API does the same).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from services.contracts.errors import InvalidArgument

MAX_BODY_BYTES = 1 << 20  # an HTTP body or gRPC message; larger ones get 413 / RESOURCE_EXHAUSTED unread
MAX_STOP = 4
MAX_STOP_CHARS = 256
MAX_SEED = 2**64 - 1  # the workers' proto carries seed as uint64
MAX_TOKENS_LIMIT = 2**31 - 1  # far above any context; the context check gives the real limit
MAX_DEPTH = 16  # JSON nesting deeper than any valid request (chat content parts are depth 5)
MAX_MESSAGES = 4096
EXTENSIONS = ("top_k", "ignore_eos")  # ours (vLLM spelling), not OpenAI's

# OpenAI request fields we accept only with the value that asks for the default behaviour; anything else is
# refused with this reason (never silently ignored). A value of None always counts as "not sent".
UNSUPPORTED: dict[str, tuple[tuple[Any, ...], str]] = {
    "logit_bias": (({},), "token biases are not implemented"),
    "response_format": (({"type": "text"},), "structured output (json_object/json_schema) is not implemented"),
    "tools": (([],), "tool calling is not implemented"),
    "tool_choice": (("none",), "tool calling is not implemented"),
    "parallel_tool_calls": ((False, True), ""),  # meaningless without tools; either value is honoured
    "functions": (([],), "function calling is not implemented"),
    "function_call": (("none",), "function calling is not implemented"),
    "logprobs": ((False,), "log probabilities are not returned"),
    "top_logprobs": ((0,), "log probabilities are not returned"),
    "echo": ((False,), "echoing the prompt is not implemented"),
    "suffix": (("",), "insertion (suffix) is not implemented"),
    "best_of": ((1,), "best_of > 1 is not implemented"),
    "n": ((1,), "only one choice per request (n = 1) is supported"),
    "presence_penalty": ((0, 0.0), "penalties are not implemented; send 0"),
    "frequency_penalty": ((0, 0.0), "penalties are not implemented; send 0"),
    "audio": ((), "audio output is not implemented"),
    "modalities": ((["text"],), "only text output is supported"),
    "prediction": ((), "predicted outputs are not implemented"),
    "web_search_options": ((), "web search is not implemented"),
    "reasoning_effort": ((), "this model has no reasoning effort setting"),
    "verbosity": ((), "this model has no verbosity setting"),
}
# OpenAI fields that change nothing about the output: accepted and recorded nowhere but the request log.
INFORMATIONAL = ("user", "metadata", "store", "service_tier", "prompt_cache_key", "safety_identifier")
_COMMON_OPENAI = {"model", "max_tokens", "temperature", "top_p", "n", "stream", "stream_options", "stop", "seed",
                  "presence_penalty", "frequency_penalty", "logit_bias", "user", "logprobs"}
OPENAI_FIELDS = {
    "completions": _COMMON_OPENAI | {"prompt", "echo", "best_of", "suffix"},
    "chat": _COMMON_OPENAI | {"messages", "max_completion_tokens", "top_logprobs", "response_format", "tools",
                              "tool_choice", "parallel_tool_calls", "functions", "function_call", "audio",
                              "modalities", "prediction", "web_search_options", "reasoning_effort", "verbosity",
                              "metadata", "store", "service_tier", "prompt_cache_key", "safety_identifier"},
}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool = False
    include_obfuscation: bool = False  # OpenAI's; we never pad, so either value is honoured


class _Common(BaseModel):
    """Fields both endpoints share, strictly typed."""

    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)
    model: str = Field(max_length=256)
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0, le=MAX_TOKENS_LIMIT)  # extension (vLLM spelling)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    ignore_eos: bool = False  # extension, for benchmarks

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> list[str]:
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop strings")
        if any(not s for s in stops):
            raise ValueError("stop strings must be non-empty")
        if any(len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"stop strings are at most {MAX_STOP_CHARS} characters")
        return stops


class CompletionBody(_Common):
    prompt: str | list[str] | list[int] | list[list[int]]


class ChatPart(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)  # `name` and friends change nothing here
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ChatPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatBody(_Common):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT)


def _pydantic_error(exc: ValidationError) -> InvalidArgument:
    first = exc.errors()[0]
    # drop union-branch names (e.g. 'prompt.str') so the param is the request field the client wrote
    loc = [str(x) for x in first["loc"] if not (isinstance(x, str) and ("[" in x or x in ("str", "list")))]
    param = ".".join(loc) or "body"
    if first["type"] == "missing":
        return InvalidArgument(f"{param}: is required", param=param)
    shown = repr(first.get("input"))
    shown = shown if len(shown) <= 80 else shown[:77] + "..."
    return InvalidArgument(f"{param}: {first['msg']} (got {shown})", param=param)


def check_tree(data: Any, max_depth: int = MAX_DEPTH) -> None:
    """Reject nesting deeper than any valid request and strings that are not valid Unicode (iteratively)."""
    stack: list[tuple[Any, int, str]] = [(data, 0, "body")]
    while stack:
        node, depth, where = stack.pop()
        if depth > max_depth:
            raise InvalidArgument(f"{where}: nested deeper than {max_depth} levels", param=where)
        if isinstance(node, str):
            _check_text(node, where)
        elif isinstance(node, dict):
            for k, v in node.items():
                _check_text(k, where)
                stack.append((v, depth + 1, k if where == "body" else where))
        elif isinstance(node, list):
            stack.extend((v, depth + 1, where) for v in node)


def _check_text(s: str, where: str) -> None:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidArgument(f"{where}: not valid Unicode (lone surrogate {s[exc.start]!r} at index {exc.start})",
                              param=where) from None


def _check_fields(data: dict, kind: Literal["completions", "chat"], extensions: tuple[str, ...]) -> None:
    declared = set((CompletionBody if kind == "completions" else ChatBody).model_fields)
    for name, value in data.items():
        if name in declared and name not in UNSUPPORTED:
            continue
        if name in UNSUPPORTED and name in OPENAI_FIELDS[kind]:
            allowed, why = UNSUPPORTED[name]
            if value is None or any(value == a and type(value) is type(a) for a in allowed):
                continue
            if name in ("presence_penalty", "frequency_penalty") and type(value) in (int, float) and value == 0:
                continue
            raise InvalidArgument(f"{name}: not supported by this gateway: {why} (got {_short(value)})", param=name)
        if name in INFORMATIONAL and name in OPENAI_FIELDS[kind]:
            continue
        if name in extensions:
            continue
        if name in OPENAI_FIELDS["completions"] | OPENAI_FIELDS["chat"]:
            raise InvalidArgument(f"{name}: not a parameter of /v1/{'chat/' if kind == 'chat' else ''}completions",
                                  param=name)
        raise InvalidArgument(f"{_short(name, 60)}: unrecognized request argument", param="body")


def _short(value: Any, n: int = 80) -> str:
    s = repr(value) if not isinstance(value, str) or n == 80 else value
    return s if len(s) <= n else s[: n - 3] + "..."


def parse(body: Any, kind: Literal["completions", "chat"],
          extensions: tuple[str, ...] = ()) -> CompletionBody | ChatBody:
    """Validate a decoded JSON body; raises InvalidArgument naming the field. `extensions`: extra fields allowed."""
    if not isinstance(body, dict):
        raise InvalidArgument("body: expected a JSON object", param="body")
    check_tree(body)
    _check_fields(body, kind, extensions)
    try:
        return (CompletionBody if kind == "completions" else ChatBody).model_validate(body)
    except ValidationError as exc:
        raise _pydantic_error(exc) from None


def openapi_body(model: type[BaseModel]) -> dict[str, Any]:
    """The route's OpenAPI `requestBody` from a body model, refs inlined (the routes read the raw body)."""
    doc = model.model_json_schema()
    defs = doc.pop("$defs", {})

    def inline(node: Any) -> Any:
        if isinstance(node, dict):
            if "$ref" in node:
                return inline(defs[node["$ref"].rsplit("/", 1)[1]])
            return {k: inline(v) for k, v in node.items()}
        if isinstance(node, list):
            return [inline(v) for v in node]
        return node

    return {"requestBody": {"required": True, "content": {"application/json": {"schema": inline(doc)}}}}
