"""`tandem bench overload`: many times a cluster's admission capacity at once; how soon the excess hears 429, what
the gateway spent on each refusal, and whether the accepted requests complete.

Two burst clients, side by side:
- `raw`: HTTP/1.1 over connections opened (and used once) beforehand; every request is written before any
  answer is read, so the whole burst leaves the client within milliseconds.
- `httpx`: one `httpx.AsyncClient` (what the overload test used to send its burst): its connection pool
  re-scans every connection for every queued request, so 64 concurrent requests leave the client over
  hundreds of milliseconds to seconds, and a late request finds places freed by early ones.
A request's latency is counted from when its bytes start leaving the client (httpx: its trace event
`http11.send_request_headers.started`) to its status line; `spread` is first send to last send.
"""

from __future__ import annotations

import asyncio
import json
import re
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

CLIENTS = ("raw", "httpx")
SCENARIOS = ("burst", "full")  # burst: an idle cluster; full: every place already taken by running requests
DECODE_BATCHING = {"max_batch": 4, "max_waiting": 4}  # 2 decode workers: the cluster holds 16
PATH = "/v1/completions"


Sched = Callable[[], tuple[float, float]]


@dataclass(slots=True)
class Reply:
    status: int
    sent: float  # time.perf_counter(): the request's bytes start leaving the client
    answered: float  # its status line (raw) / response headers (httpx) read
    retry_after: str | None
    body: bytes
    loop: tuple[float, float] = (0.0, 0.0)  # the gateway's event-loop thread when answered: (ran, waited) ms


def loop_sched(pid: int) -> Sched:
    """The gateway's main thread (its event loop) as Linux accounts it: CPU time it ran, time it waited for a
    CPU while runnable; cumulative milliseconds (/proc/PID/task/PID/schedstat)."""
    path = Path(f"/proc/{pid}/task/{pid}/schedstat")

    def read() -> tuple[float, float]:
        try:
            ran, waited, _ = path.read_text().split()
        except (OSError, ValueError):
            return (0.0, 0.0)
        return int(ran) / 1e6, int(waited) / 1e6

    return read


def completion(i: int, max_tokens: int, model: str = "bench") -> bytes:
    """Greedy, ignore_eos: an accepted request always runs `max_tokens` tokens; prompts differ per request."""
    return json.dumps({"model": model, "prompt": [5, 6, 7 + i % 50, 8 + i // 50], "max_tokens": max_tokens,
                       "temperature": 0, "ignore_eos": True}).encode()


def _request(host: str, body: bytes, method: str = "POST", path: str = PATH) -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nhost: {host}\r\ncontent-type: application/json\r\n"
    return f"{head}content-length: {len(body)}\r\n\r\n".encode() + body


async def _answer(reader: asyncio.StreamReader, sched: Sched | None = None
                  ) -> tuple[int, float, dict[str, str], bytes, tuple[float, float]]:
    """One HTTP/1.1 answer with a content-length (every non-streamed gateway answer has one)."""
    line = await reader.readline()
    at = time.perf_counter()
    loop = sched() if sched else (0.0, 0.0)
    if not line:
        raise ConnectionError("the gateway closed the connection without an answer")
    headers: dict[str, str] = {}
    while (raw := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = raw.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return int(line.split()[1]), at, headers, body, loop


class RawConnections:
    """`n` keep-alive connections to the gateway, each already accepted and used once (GET /v1/models)."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.conns: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def open(self, n: int) -> RawConnections:
        self.conns = list(await asyncio.gather(*[asyncio.open_connection(self.host, self.port) for _ in range(n)]))
        for _, w in self.conns:
            w.write(_request(self.host, b"", "GET", "/v1/models"))
        await asyncio.gather(*[_answer(r) for r, _ in self.conns])
        return self

    def send(self, bodies: list[bytes]) -> list[float]:
        """Write every request (one per connection) before reading anything; when each was handed over."""
        sent = []
        for (_, w), body in zip(self.conns, bodies, strict=True):
            sent.append(time.perf_counter())
            w.write(_request(self.host, body))
        return sent

    async def replies(self, sent: list[float], sched: Sched | None = None) -> list[Reply]:
        out = await asyncio.gather(*[_answer(r, sched) for r, _ in self.conns])
        return [Reply(code, t0, at, headers.get("retry-after"), body, loop)
                for t0, (code, at, headers, body, loop) in zip(sent, out, strict=True)]

    def close(self) -> None:
        for _, w in self.conns:
            w.close()


class RawBurst:
    """The `raw` client: connections opened before the burst, every request written before any answer is read."""

    def __init__(self, base: str, sched: Sched | None = None) -> None:
        host, port = base.removeprefix("http://").rsplit(":", 1)
        self.conns, self.sched = RawConnections(host, int(port)), sched

    async def prepare(self, n: int) -> None:
        await self.conns.open(n)

    async def fire(self, bodies: list[bytes]) -> list[Reply]:
        try:
            return await self.conns.replies(self.conns.send(bodies), self.sched)
        finally:
            self.conns.close()


class HttpxBurst:
    """The `httpx` client: one AsyncClient, one warm connection per request, the requests gathered."""

    def __init__(self, base: str, sched: Sched | None = None) -> None:
        self.base, self.sched = base, sched
        self.client: httpx.AsyncClient | None = None

    async def prepare(self, n: int) -> None:
        limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
        self.client = httpx.AsyncClient(timeout=600, limits=limits)
        await asyncio.gather(*[self.client.get(f"{self.base}/v1/models") for _ in range(n)])

    async def fire(self, bodies: list[bytes]) -> list[Reply]:
        assert self.client is not None
        c = self.client

        async def one(body: bytes) -> Reply:
            stamps: dict[str, float] = {}
            loop = (0.0, 0.0)

            async def trace(event: str, info: dict) -> None:
                nonlocal loop
                stamps.setdefault(event, time.perf_counter())
                if event == "http11.receive_response_headers.complete" and self.sched:
                    loop = self.sched()

            r = await c.post(f"{self.base}{PATH}", content=body, headers={"content-type": "application/json"},
                             extensions={"trace": trace})
            return Reply(r.status_code, stamps["http11.send_request_headers.started"],
                         stamps["http11.receive_response_headers.complete"], r.headers.get("retry-after"), r.content,
                         loop)

        try:
            return list(await asyncio.gather(*[one(b) for b in bodies]))
        finally:
            await c.aclose()


BURSTS: dict[str, type[RawBurst] | type[HttpxBurst]] = {"raw": RawBurst, "httpx": HttpxBurst}


async def burst(client: str, base: str, bodies: list[bytes], sched: Sched | None = None
                ) -> tuple[tuple[float, float], list[Reply]]:
    """`bodies` as one burst from `client` (its connections opened first); the gateway loop's schedstat just
    before the burst, and the replies."""
    b = BURSTS[client](base, sched)
    await b.prepare(len(bodies))
    return (sched() if sched else (0.0, 0.0)), await b.fire(bodies)


def _inflight(base: str) -> float:
    m = re.search(r"^tandem_gateway_inflight (\S+)$", httpx.get(f"{base}/metrics", timeout=10).text, re.M)
    return float(m.group(1)) if m else 0.0


def door_histogram(base: str) -> dict[float, float]:
    """The gateway's refusal-time histogram (reason="full"): cumulative count per upper bound, seconds."""
    text = httpx.get(f"{base}/metrics", timeout=10).text
    pat = r'^tandem_gateway_refusal_seconds_bucket\{le="([^"]+)",reason="full"\} (\S+)$'
    return {float(le): float(v) for le, v in re.findall(pat, text, re.M)}


def bucket_quantile(before: dict[float, float], after: dict[float, float], q: float) -> float | None:
    """The upper bound of the bucket holding quantile q of the refusals between two scrapes."""
    delta = sorted((le, after[le] - before.get(le, 0.0)) for le in after)
    total = delta[-1][1] if delta else 0.0
    if not total:
        return None
    return next(le for le, n in delta if n >= q * total)


@dataclass
class Round:
    client: str
    scenario: str
    sent: int
    accepted: int  # 200
    refused: int  # 429
    other: dict[str, int]  # any other status: the bench's failure
    completed: int  # accepted with all their tokens
    retry_after: int  # refusals carrying Retry-After >= 1
    spread_ms: float  # first request sent -> last request sent
    refused_ms: list[float] = field(default_factory=list)  # each 429: sent -> status line
    window_ms: float = 0.0  # first request sent -> last 429 read
    loop_ran_ms: float = 0.0  # meanwhile, the gateway's event-loop thread: on a CPU
    loop_waited_ms: float = 0.0  # ... and runnable but waiting for a CPU
    held: int = 0  # "full": requests holding the cluster's places, all of which must complete too
    held_completed: int = 0


def _complete(r: Reply, max_tokens: int) -> bool:
    try:
        doc = json.loads(r.body)
        return doc["usage"]["completion_tokens"] == max_tokens and doc["choices"][0]["finish_reason"] == "length"
    except (ValueError, KeyError, IndexError, TypeError):
        return False


def _round(client: str, scenario: str, start: tuple[float, float], replies: list[Reply], max_tokens: int) -> Round:
    sent = [r.sent for r in replies]
    other: dict[str, int] = {}
    for r in replies:
        if r.status not in (200, 429):
            other[str(r.status)] = other.get(str(r.status), 0) + 1
    refused = [r for r in replies if r.status == 429]
    rnd = Round(client, scenario, len(replies), sum(r.status == 200 for r in replies), len(refused), other,
                sum(r.status == 200 and _complete(r, max_tokens) for r in replies),
                sum((r.retry_after or "").isdigit() and int(r.retry_after) >= 1 for r in refused),
                (max(sent) - min(sent)) * 1e3, [(r.answered - r.sent) * 1e3 for r in refused])
    if refused:
        last = max(refused, key=lambda r: r.answered)
        rnd.window_ms = (last.answered - min(sent)) * 1e3
        rnd.loop_ran_ms, rnd.loop_waited_ms = last.loop[0] - start[0], last.loop[1] - start[1]
    return rnd


async def _burst(client: str, base: str, bodies: list[bytes], max_tokens: int, sched: Sched) -> Round:
    """Every request at once against an idle cluster."""
    start, replies = await burst(client, base, bodies, sched)
    return _round(client, "burst", start, replies, max_tokens)


async def _full(client: str, base: str, bodies: list[bytes], max_tokens: int, sched: Sched, capacity: int,
                hold_tokens: int) -> Round:
    """Take every place with `capacity` requests of `hold_tokens` (raw, written and left running), then burst
    the rest as soon as the gateway counts them all in flight."""
    host, port = base.removeprefix("http://").rsplit(":", 1)
    hold = await RawConnections(host, int(port)).open(capacity)
    b = BURSTS[client](base, sched)
    await b.prepare(len(bodies))  # before the places are taken: the burst follows them at once
    sent = hold.send([completion(1000 + i, hold_tokens) for i in range(capacity)])
    try:
        deadline = time.monotonic() + 60
        while await asyncio.to_thread(_inflight, base) < capacity:
            if time.monotonic() > deadline:
                raise RuntimeError("the holding requests never took every place")
            await asyncio.sleep(0.005)
        start = sched()
        rnd = _round(client, "full", start, await b.fire(bodies), max_tokens)
        held = await hold.replies(sent)
    finally:
        hold.close()
    rnd.held, rnd.held_completed = len(held), sum(r.status == 200 and _complete(r, hold_tokens) for r in held)
    return rnd


def _idle(base: str, timeout_s: float = 600) -> None:
    deadline = time.monotonic() + timeout_s
    while _inflight(base) > 0:
        if time.monotonic() > deadline:
            raise RuntimeError("requests are still in flight")
        time.sleep(0.1)


def percentile(xs: list[float], q: float) -> float:
    """Nearest-rank percentile (the p99 of 100 values is the 99th smallest)."""
    s = sorted(xs)
    return s[max(0, min(len(s) - 1, int(round(q * len(s))) - 1))]


def summarize(rounds: list[Round]) -> list[dict]:
    """One row per (client, scenario), the rounds pooled (medians of the per-round figures)."""
    rows = []
    for key in dict.fromkeys((r.client, r.scenario) for r in rounds):
        rs = [r for r in rounds if (r.client, r.scenario) == key]
        lat = [x for r in rs for x in r.refused_ms]
        other: dict[str, int] = {}
        for r in rs:
            for k, v in r.other.items():
                other[k] = other.get(k, 0) + v
        rows.append({"client": key[0], "scenario": key[1], "rounds": len(rs), "sent": sum(r.sent for r in rs),
                     "accepted": sum(r.accepted for r in rs), "refused": sum(r.refused for r in rs),
                     "other": other, "completed": sum(r.completed + r.held_completed for r in rs),
                     "accepted_total": sum(r.accepted + r.held for r in rs),
                     "retry_after": sum(r.retry_after for r in rs),
                     "spread_ms": statistics.median(r.spread_ms for r in rs),
                     "refused_p50_ms": statistics.median(lat) if lat else None,
                     "refused_p99_ms": percentile(lat, 0.99) if lat else None,
                     "refused_max_ms": max(lat) if lat else None,
                     "window_ms": statistics.median(r.window_ms for r in rs),
                     "loop_ran_ms": statistics.median(r.loop_ran_ms for r in rs),
                     "loop_waited_ms": statistics.median(r.loop_waited_ms for r in rs)})
    return rows


def run_overload(model: str | None = None, factor: int = 4, max_tokens: int = 200, hold_tokens: int = 1000,
                 rounds: int = 3, clients: tuple[str, ...] = CLIENTS, scenarios: tuple[str, ...] = SCENARIOS,
                 workdir: str | None = None, say: Callable[[str], None] = print) -> dict:
    """Start `tandem up` (1 prefill + 2 decode, capacity 16), run every (client, scenario) `rounds` times."""
    import os

    from services.bench.faults_cluster import Cluster
    from services.contracts.layout import parse_layout

    work = Path(workdir or tempfile.mkdtemp(prefix="tandem-overload-"))
    work.mkdir(parents=True, exist_ok=True)
    cluster = Cluster(work, model, "memory", stall_s=15.0, decode_batching=DECODE_BATCHING)
    capacity = parse_layout(cluster.doc).capacity()
    results: list[Round] = []
    door: dict[str, dict[float, float]] = {}
    try:
        say(f"starting the cluster (logs in {cluster.log_dir}); capacity {capacity}")
        cluster.start()
        sched = loop_sched(cluster.pid("gateway"))
        _idle(cluster.http)
        loads = [os.getloadavg()[0]]
        for i in range(rounds):
            for scenario in scenarios:
                for client in clients:
                    before = door_histogram(cluster.http)
                    if scenario == "burst":
                        bodies = [completion(j, max_tokens) for j in range(factor * capacity)]
                        rnd = asyncio.run(_burst(client, cluster.http, bodies, max_tokens, sched))
                    else:
                        bodies = [completion(j, max_tokens) for j in range((factor - 1) * capacity)]
                        rnd = asyncio.run(_full(client, cluster.http, bodies, max_tokens, sched, capacity,
                                                hold_tokens))
                    after = door_histogram(cluster.http)
                    key = f"{client}/{scenario}"
                    door[key] = {le: door.get(key, {}).get(le, 0.0) + after[le] - before.get(le, 0.0) for le in after}
                    results.append(rnd)
                    loads.append(os.getloadavg()[0])
                    lat = sorted(rnd.refused_ms)
                    say(f"round {i + 1} {client:5s} {scenario:5s}: {rnd.accepted} x 200, {rnd.refused} x 429, other "
                        f"{rnd.other or 0}; sent over {rnd.spread_ms:.1f} ms; 429 p50 "
                        f"{statistics.median(lat) if lat else float('nan'):.1f} ms, max {lat[-1] if lat else 0:.1f} ms;"
                        f" gateway loop ran {rnd.loop_ran_ms:.1f} ms, waited for a CPU {rnd.loop_waited_ms:.1f} ms")
                    _idle(cluster.http)
    finally:
        cluster.stop()
    rows = summarize(results)
    for row in rows:
        hist = door.get(f"{row['client']}/{row['scenario']}", {})
        row["door_p50_le_ms"] = _ms(bucket_quantile({}, hist, 0.5))
        row["door_p99_le_ms"] = _ms(bucket_quantile({}, hist, 0.99))
    return {"config": {"model": Path(model).name if model else "embedded SmolLM2-135M", "layout": "1 prefill + 2 decode (tandem up)",
                       "decode_batching": DECODE_BATCHING, "capacity": capacity, "factor": factor,
                       "max_tokens": max_tokens, "hold_tokens": hold_tokens, "rounds": rounds, "cores": os.cpu_count(),
                       "load_average": {"min": min(loads), "max": max(loads)}},
            "rows": rows, "rounds": [asdict(r) for r in results]}


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1e3
