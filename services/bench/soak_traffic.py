"""The soak's requests, one at a time: valid streams over HTTP (OpenAI SSE) and gRPC (services.client), deliberate
client cancels mid-stream, and deliberate invalid requests whose refusal is known in advance. Each returns an
Outcome that says whether what happened was what the request was built to get."""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass, field

import httpx
import numpy as np

from services.client import AsyncClient
from services.contracts.errors import TandemError

WORDS = ("alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet")
OVERSIZE_BYTES = 2 << 20  # above the gateway's 1 MiB limit for a body or a gRPC message


@dataclass(slots=True)
class Plan:
    """What one stream slot sends next."""

    door: str  # "http" or "grpc"
    kind: str  # "completions" or "chat"
    prompt: str
    max_tokens: int
    seed: int
    cancel_after: int | None  # tokens to read before cancelling; None = read to the end

    @property
    def label(self) -> str:
        return f"{self.door}-{self.kind}"


@dataclass(slots=True)
class Outcome:
    label: str  # http-completions, grpc-chat, invalid:bad_json, ...
    result: str  # "completed", "cancelled" (deliberate), "refused" (deliberate, as expected), "unexpected"
    detail: str = ""  # for "unexpected": what went wrong (its kind is the part before the first ':')
    ttft_s: float | None = None
    gaps_s: list[float] = field(default_factory=list)
    tokens: int = 0


def plan(rng: random.Random, max_tokens: int, grpc_share: float, chat_share: float, cancel_share: float) -> Plan:
    """A request mix drawn from `rng`: lengths in [max_tokens/2, max_tokens] so the streams stay out of step."""
    n = rng.randint(max(2, max_tokens // 2), max_tokens)
    words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12)))
    cancel = rng.randint(1, max(1, n // 2)) if rng.random() < cancel_share else None
    return Plan("grpc" if rng.random() < grpc_share else "http", "chat" if rng.random() < chat_share else "completions",
                f"{words}: the quick brown fox", n, rng.randrange(2**31), cancel)


class Traffic:
    """Sends Plans and invalid requests to one gateway (its HTTP base URL and gRPC address)."""

    def __init__(self, http: str, grpc_target: str, model: str, api_key: str | None, connections: int) -> None:
        self.http, self.model, self.api_key = http.rstrip("/"), model, api_key
        limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
        timeout = httpx.Timeout(600.0, connect=60.0, pool=600.0)
        self.client = httpx.AsyncClient(timeout=timeout, limits=limits)
        self.grpc = AsyncClient(grpc_target, api_key=api_key, timeout=600.0, model=model)
        self.grpc_wrong = AsyncClient(grpc_target, api_key="wrong-" + (api_key or "key"), timeout=60.0, model=model)

    async def close(self) -> None:
        await self.client.aclose()
        await self.grpc.close()
        await self.grpc_wrong.close()

    def _headers(self, key: str | None = None) -> dict[str, str]:
        key = key if key is not None else self.api_key
        return {"authorization": f"Bearer {key}"} if key else {}

    def _body(self, p: Plan) -> dict:
        body: dict = {"model": self.model, "max_tokens": p.max_tokens, "temperature": 0.8, "seed": p.seed,
                      "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
        if p.kind == "chat":
            body["messages"] = [{"role": "user", "content": p.prompt}]
        else:
            body["prompt"] = p.prompt
        return body

    async def send(self, p: Plan) -> Outcome:
        try:
            return await (self._http(p) if p.door == "http" else self._grpc(p))
        except TandemError as exc:
            return Outcome(p.label, "unexpected", f"grpc {exc.code}: {exc.message[:160]}")
        except httpx.HTTPError as exc:
            return Outcome(p.label, "unexpected", f"{type(exc).__name__}: {str(exc)[:160]}")

    async def _http(self, p: Plan) -> Outcome:
        path = "/v1/chat/completions" if p.kind == "chat" else "/v1/completions"
        t0 = time.perf_counter()
        times: list[float] = []
        usage, finish = None, None
        async with self.client.stream("POST", self.http + path, json=self._body(p), headers=self._headers()) as r:
            if r.status_code != 200:
                return Outcome(p.label, "unexpected", f"http {r.status_code}: {(await r.aread())[:160]!r}")
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                doc = json.loads(line[6:])
                if "error" in doc:
                    return Outcome(p.label, "unexpected", f"stream error: {str(doc['error'].get('message'))[:160]}")
                usage = doc.get("usage") or usage
                for choice in doc.get("choices") or ():
                    delta = choice.get("delta", {})
                    if p.kind == "completions" or ("content" in delta and "role" not in delta):
                        times.append(time.perf_counter())  # one event per token step the gateway sent
                    finish = choice.get("finish_reason") or finish
                if p.cancel_after is not None and len(times) >= p.cancel_after:
                    break  # leaving the block closes the connection: the gateway sees a disconnect
        return self._end(p, t0, times, finish, (usage or {}).get("completion_tokens"))

    async def _grpc(self, p: Plan) -> Outcome:
        kw = {"max_tokens": p.max_tokens, "temperature": 0.8, "seed": p.seed, "ignore_eos": True}
        stream = (self.grpc.stream(messages=[("user", p.prompt)], **kw) if p.kind == "chat"
                  else self.grpc.stream(p.prompt, **kw))
        t0 = time.perf_counter()
        times: list[float] = []
        tokens, finish = 0, None
        async for d in stream:
            now = time.perf_counter()
            times += [now] * len(d.token_ids)
            tokens += len(d.token_ids)
            finish = d.finish_reason or finish
            if p.cancel_after is not None and tokens >= p.cancel_after:
                stream.cancel()
                break
        return self._end(p, t0, times, finish, tokens)

    @staticmethod
    def _end(p: Plan, t0: float, times: list[float], finish: str | None, tokens: int | None) -> Outcome:
        gaps = [g for g in np.diff(times).tolist() if g > 0]  # the tokens of one message arrive together
        out = Outcome(p.label, "completed", ttft_s=times[0] - t0 if times else None, gaps_s=gaps,
                      tokens=tokens if tokens is not None else len(times))
        if p.cancel_after is not None and len(times) >= p.cancel_after and finish is None:
            out.result, out.label = "cancelled", f"cancel:{p.label}"
        elif finish is None:
            out.result, out.detail = "unexpected", f"no finish reason: the stream ended after {len(times)} tokens"
        elif tokens != p.max_tokens:
            out.result, out.detail = "unexpected", f"short: {tokens} of {p.max_tokens} tokens (ignore_eos)"
        return out

    # The deliberate invalid requests: the answer each must get, else it is an unexpected error.
    def invalid_kinds(self) -> list[str]:
        kinds = ["bad_json", "bad_field", "unknown_field", "oversize", "grpc_bad_field", "grpc_oversize"]
        return kinds + (["wrong_key", "grpc_wrong_key"] if self.api_key else [])

    async def invalid(self, kind: str) -> Outcome:
        label = f"invalid:{kind}"
        try:
            if kind.startswith("grpc_"):
                return await self._invalid_grpc(kind, label)
            url = self.http + "/v1/completions"
            ok = {"model": self.model, "prompt": "hello", "max_tokens": 4}
            if kind == "bad_json":
                r, want = await self.client.post(url, content=b'{"model": "x", "prompt": ', headers=self._headers()), 400
            elif kind == "bad_field":
                r, want = await self.client.post(url, json={**ok, "max_tokens": "4"}, headers=self._headers()), 400
            elif kind == "unknown_field":
                r, want = await self.client.post(url, json={**ok, "max_tokns": 4}, headers=self._headers()), 400
            elif kind == "oversize":
                return await self._oversize(label)
            elif kind == "wrong_key":
                r, want = await self.client.post(url, json=ok, headers=self._headers("wrong-key")), 401
            else:
                raise ValueError(f"unknown invalid kind {kind!r}")
        except httpx.HTTPError as exc:
            return Outcome(label, "unexpected", f"{type(exc).__name__}: {str(exc)[:160]}")
        if r.status_code == want and "error" in r.json():
            return Outcome(label, "refused")
        return Outcome(label, "unexpected", f"http {r.status_code} (wanted {want}): {r.text[:160]}")

    async def _oversize(self, label: str) -> Outcome:
        """A request head announcing a body over the limit, on its own connection: the gateway must answer 413
        at once, without the body (which is never sent; a client that streamed it would race the close)."""
        host, _, port = self.http.removeprefix("http://").rpartition(":")
        auth = "".join(f"{k}: {v}\r\n" for k, v in self._headers().items())
        head = (f"POST /v1/completions HTTP/1.1\r\nhost: {host}:{port}\r\ncontent-type: application/json\r\n"
                f"content-length: {OVERSIZE_BYTES}\r\n{auth}\r\n")
        try:
            reader, writer = await asyncio.open_connection(host, int(port))
        except OSError as exc:
            return Outcome(label, "unexpected", f"connect: {exc}")
        try:
            writer.write(head.encode())
            await writer.drain()
            status = await asyncio.wait_for(reader.readline(), 60.0)
        except (OSError, TimeoutError) as exc:
            return Outcome(label, "unexpected", f"{type(exc).__name__}: {str(exc)[:160]}")
        finally:
            writer.close()
        if status.split(b" ")[1:2] == [b"413"]:
            return Outcome(label, "refused")
        return Outcome(label, "unexpected", f"http {status[:80]!r} (wanted 413)")

    async def _invalid_grpc(self, kind: str, label: str) -> Outcome:
        if kind == "grpc_bad_field":
            call, want = self.grpc.generate("hello", max_tokens=4, temperature=5.0), "INVALID_ARGUMENT"
        elif kind == "grpc_oversize":
            call, want = self.grpc.generate("a" * OVERSIZE_BYTES, max_tokens=4), "RESOURCE_EXHAUSTED"
        elif kind == "grpc_wrong_key":
            call, want = self.grpc_wrong.generate("hello", max_tokens=4), "UNAUTHENTICATED"
        else:
            raise ValueError(f"unknown invalid kind {kind!r}")
        try:
            await call
        except TandemError as exc:
            # RESOURCE_EXHAUSTED is also the admission refusal: only grpc's size check counts as the deliberate one
            if exc.code == want and (want != "RESOURCE_EXHAUSTED" or "larger than max" in exc.message):
                return Outcome(label, "refused")
            return Outcome(label, "unexpected", f"grpc {exc.code} (wanted {want}): {exc.message[:160]}")
        return Outcome(label, "unexpected", f"accepted (wanted {want})")
