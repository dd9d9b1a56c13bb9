"""`tandem client PROMPT`: stream a completion or chat from a running cluster (gRPC, or the gateway's HTTP)."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from typing import Any

import typer

from services.client.types import DEFAULT_TARGET


def http_stream(url: str, prompt: str, chat: bool, api_key: str | None, timeout: float,
                **sampling: Any) -> Iterator[str]:
    """Text deltas of one streamed request to the gateway's OpenAI-compatible HTTP API (SSE)."""
    import httpx

    from services.contracts import errors

    base = url.rstrip("/").removesuffix("/v1")
    body: dict[str, Any] = {"model": "", "stream": True, **{k: v for k, v in sampling.items() if v is not None}}
    if chat:
        path, body["messages"] = "/v1/chat/completions", [{"role": "user", "content": prompt}]
    else:
        path, body["prompt"] = "/v1/completions", prompt
    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
    kinds = {400: errors.InvalidArgument, 401: errors.Unauthenticated, 404: errors.NotFound,
             413: errors.InvalidArgument, 429: errors.ResourceExhausted, 503: errors.Unavailable,
             504: errors.DeadlineExceeded}
    try:
        with httpx.stream("POST", base + path, json=body, headers=headers, timeout=timeout) as r:
            if r.status_code != 200:
                r.read()
                try:
                    err = r.json()["error"]
                except (ValueError, KeyError, TypeError):
                    err = {"message": r.text[:300], "param": None}
                raise kinds.get(r.status_code, errors.TandemError)(
                    f"{base} answered {r.status_code}: {err.get('message')}", param=err.get("param"))
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                doc = json.loads(line[6:])
                if "error" in doc:
                    raise errors.TandemError(f"{base}: {doc['error'].get('message')}")
                for choice in doc.get("choices", ()):
                    text = choice.get("text") if not chat else choice.get("delta", {}).get("content")
                    if text:
                        yield text
    except httpx.TimeoutException as exc:
        raise errors.DeadlineExceeded(f"{base}: no answer within {timeout:g} s ({exc})") from None
    except httpx.TransportError as exc:
        raise errors.Unavailable(f"{base} unavailable: {exc}") from None


def register(group: Callable[[str], typer.Typer]) -> None:
    app = group("")

    @app.command("client")
    def client_cmd(
        prompt: str = typer.Argument(..., help="the prompt (with --chat: the user message)"),
        max_tokens: int = typer.Option(None, "--max-tokens", help="tokens to generate at most (default: the gateway's, 16)"),
        temperature: float = typer.Option(None, "--temperature", help="0 = greedy (default: the gateway's, 1.0)"),
        top_p: float = typer.Option(None, "--top-p", help="nucleus sampling mass in (0, 1]"),
        seed: int = typer.Option(None, "--seed", help="seed for reproducible sampling"),
        stop: list[str] = typer.Option([], "--stop", help="stop string (repeatable); not printed"),
        chat: bool = typer.Option(False, "--chat", help="send the prompt as one user chat message"),
        target: str = typer.Option(DEFAULT_TARGET, "--target", help="gateway gRPC HOST:PORT"),
        http: str = typer.Option(None, "--http", help="use the gateway's HTTP API at this URL instead of gRPC"),
        api_key: str = typer.Option(None, "--api-key", envvar="TANDEM_API_KEY", show_envvar=True,
                                    help="API key (sent as 'Bearer KEY')"),
        timeout: float = typer.Option(300.0, "--timeout", help="deadline for the whole request, seconds"),
        tls: bool = typer.Option(False, "--tls", help="gRPC over TLS (system roots unless --ca)"),
        ca: str = typer.Option(None, "--ca", help="PEM file of the CA that signed the gateway's certificate"),
    ) -> None:
        """Stream a continuation from a running cluster; prints only the generated text on stdout."""
        sampling = {"max_tokens": max_tokens, "temperature": temperature, "top_p": top_p, "seed": seed,
                    "stop": list(stop) or None}
        if http:
            pieces: Iterator[str] = http_stream(http, prompt, chat, api_key, timeout, **sampling)
        else:
            pieces = _grpc_pieces(target, prompt, chat, api_key, timeout, tls or bool(ca), ca, sampling)
        out = sys.stdout
        for text in pieces:
            out.write(text)
            out.flush()
        if out.isatty():
            out.write("\n")


def _grpc_pieces(target: str, prompt: str, chat: bool, api_key: str | None, timeout: float, tls: bool,
                 ca: str | None, sampling: dict[str, Any]) -> Iterator[str]:
    from services.client import TLS, Client

    kw = {k: v for k, v in sampling.items() if v is not None}
    with Client(target, api_key=api_key, timeout=timeout, tls=TLS(ca) if tls else None) as c:
        stream = c.stream(messages=[("user", prompt)], **kw) if chat else c.stream(prompt, **kw)
        for delta in stream:
            if delta.text:
                yield delta.text
