"""`tandem bench faults`: start a split cluster (`tandem up`: 1 prefill + 2 decode workers, a private Redis as
its registry), run greedy streams through it, break one part per scenario, and count what the clients saw.

Scenarios: SIGKILL a decode worker holding live streams; SIGSTOP one for longer than its heartbeat TTL, then
SIGCONT; corrupt one KV chunk on its way to a decode worker (a proxy registered as a decode worker); pause
Redis (CLIENT PAUSE); kill Redis and start it again. Per scenario: requests accepted (HTTP 200), completed,
identical to the fault-free reference, lost (accepted but not completed), and the recovery time (from the
end of the fault, or the kill, until every worker is registered and healthy again).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

from services.bench.faults_cluster import Cluster, Redis, registered

SCENARIOS = ("kill", "stop", "corrupt", "redis-pause", "redis-kill")
PROMPT_WORDS = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet",
                "kilo", "lima", "mike", "november", "oscar", "papa", "quebec", "romeo", "sierra", "tango"]


@dataclass(slots=True)
class Outcome:
    scenario: str
    accepted: int = 0
    completed: int = 0
    identical: int = 0
    lost: int = 0
    rejected: int = 0  # not accepted (an HTTP error before the stream began)
    recovery_s: float | None = None
    fault: str = ""
    errors: list[str] = field(default_factory=list)


def stream(http: str, prompt: str, max_tokens: int, progress: list[int], i: int) -> tuple[bool, str | None, str]:
    """One greedy streamed completion: (accepted, text or None if it did not complete, error)."""
    body = {"model": "bench", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True}
    text, done = [], False
    try:
        with httpx.stream("POST", f"{http}/v1/completions", json=body, timeout=300) as r:
            if r.status_code != 200:
                return False, None, f"HTTP {r.status_code}: {r.read()[:200]!r}"
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    break
                doc = json.loads(line[6:])
                if "error" in doc:
                    return True, None, str(doc["error"].get("message"))[:200]
                choice = doc["choices"][0]
                text.append(choice.get("text", ""))
                progress[i] += 1
                done = done or choice.get("finish_reason") is not None
    except (httpx.HTTPError, ValueError) as exc:
        return True, None, f"{type(exc).__name__}: {exc}"[:200]
    return True, ("".join(text) if done else None), "" if done else "stream ended without a finish reason"


def prompts(n: int) -> list[str]:
    return [f"{PROMPT_WORDS[i % len(PROMPT_WORDS)]} {i}: the quick brown fox" for i in range(n)]


def wave(http: str, max_tokens: int, n: int, fault: Callable[[], None] | None = None,
         min_tokens: int = 2) -> list[tuple[bool, str | None, str]]:
    """`n` concurrent streams; once each has `min_tokens` chunks, run `fault` (in this thread)."""
    results: list = [None] * n
    progress = [0] * n
    ps = prompts(n)

    def run(i: int) -> None:
        results[i] = stream(http, ps[i], max_tokens, progress, i)

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    if fault is not None:
        deadline = time.monotonic() + 120
        while min(progress) < min_tokens and time.monotonic() < deadline and any(t.is_alive() for t in threads):
            time.sleep(0.01)
        fault()
    for t in threads:
        t.join(600)
    return results


def tally(name: str, results: list, reference: list[str]) -> Outcome:
    out = Outcome(name)
    for (accepted, text, err), ref in zip(results, reference, strict=True):
        out.accepted += accepted
        out.rejected += not accepted
        if text is not None:
            out.completed += 1
            out.identical += text == ref
        elif accepted:
            out.lost += 1
        if err:
            out.errors.append(err)
    return out


def wait_whole(cluster: Cluster, since: float, timeout_s: float = 300.0) -> float | None:
    while not cluster.whole():
        if time.monotonic() - since > timeout_s:
            return None
        time.sleep(0.05)
    return round(time.monotonic() - since, 2)


def watch_recovery(cluster: Cluster, since: float, expect_dip: bool, result: dict) -> threading.Thread:
    """In the background: (optionally wait for the cluster to notice the fault, then) time until it is whole."""

    def run() -> None:
        if expect_dip:
            end = time.monotonic() + 10
            while cluster.whole() and time.monotonic() < end:
                time.sleep(0.02)
        result["recovery_s"] = wait_whole(cluster, since)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


@dataclass(slots=True)
class Bench:
    cluster: Cluster
    redis: Redis
    reference: list[str]
    streams: int
    max_tokens: int
    ttl_s: float
    stall_s: float

    def run(self, name: str) -> Outcome:
        return getattr(self, name.replace("-", "_"))()

    def _busiest_decode(self) -> str:
        return max(("decode-0", "decode-1"), key=self._live)

    def _live(self, name: str) -> int:
        return self.cluster.live_on(name, self.redis.port)

    def kill(self) -> Outcome:
        info: dict = {}

        def fault() -> None:
            victim = self._busiest_decode()
            live = self._live(victim)
            os.kill(self.cluster.pid(victim), signal.SIGKILL)
            info["fault"] = f"SIGKILL {victim} holding {live} live streams"
            info["watch"] = watch_recovery(self.cluster, time.monotonic(), True, info)

        out = tally("kill", wave(self.cluster.http, self.max_tokens, self.streams, fault), self.reference)
        info["watch"].join(330)
        out.fault, out.recovery_s = info["fault"], info.get("recovery_s")
        return out

    def stop(self) -> Outcome:
        info: dict = {}
        hold = max(2 * self.ttl_s, self.stall_s + 1.0)

        def fault() -> None:
            victim = self._busiest_decode()
            live = self._live(victim)
            pid = self.cluster.pid(victim)
            os.kill(pid, signal.SIGSTOP)
            time.sleep(hold)
            os.kill(pid, signal.SIGCONT)
            info["fault"] = f"SIGSTOP {victim} holding {live} live streams for {hold:.1f}s (TTL {self.ttl_s}s)"
            info["watch"] = watch_recovery(self.cluster, time.monotonic(), False, info)

        out = tally("stop", wave(self.cluster.http, self.max_tokens, self.streams, fault), self.reference)
        info["watch"].join(330)
        out.fault, out.recovery_s = info["fault"], info.get("recovery_s")
        return out

    def corrupt(self) -> Outcome:
        from services.bench.faultproxy import CorruptingProxy
        from services.registry.live import Heartbeat, WorkerRecord
        from services.registry.redis_store import PREFIX, RedisRegistry

        target = f"127.0.0.1:{self.cluster.ports['decode-1']}"
        proxy = CorruptingProxy(target)
        store = RedisRegistry(f"redis://127.0.0.1:{self.redis.port}/0?ttl_s={self.ttl_s}")

        def mirror() -> WorkerRecord:  # decode-1's own record, reachable through the proxy
            rec = WorkerRecord.from_json(store.client.get(PREFIX + target))
            return WorkerRecord(**{**asdict(rec), "address": proxy.address, "index": 9})

        beat = Heartbeat(store, mirror).start()
        try:
            deadline = time.monotonic() + 10
            while proxy.address not in httpx.get(f"{self.cluster.http}/health", timeout=2).text:
                if time.monotonic() > deadline:
                    raise RuntimeError("the gateway never saw the proxy registered")
                time.sleep(0.1)
            proxy.arm(1)
            results = wave(self.cluster.http, self.max_tokens, self.streams)
            out = tally("corrupt", results, self.reference)
            out.fault = f"{proxy.corrupted} KV chunk(s) corrupted between prefill-0 and decode-1"
        finally:
            beat.stop()
            proxy.close()
            store.close()
        return out

    def redis_pause(self) -> Outcome:
        info: dict = {}
        hold = 3 * self.ttl_s

        def fault() -> None:
            self.redis.pause(hold)
            info["watch"] = self._watch_registered(time.monotonic() + hold, info)

        out = tally("redis-pause", wave(self.cluster.http, self.max_tokens, self.streams, fault), self.reference)
        info["watch"].join(150)
        out.fault = f"CLIENT PAUSE {hold:.1f}s (TTL {self.ttl_s}s) under {self.streams} live streams"
        out.recovery_s = info.get("recovery_s")
        return out

    def redis_kill(self) -> Outcome:
        info: dict = {}
        down = 2 * self.ttl_s

        def fault() -> None:
            self.redis.kill()
            time.sleep(down)
            self.redis.start()
            info["watch"] = self._watch_registered(time.monotonic(), info)

        out = tally("redis-kill", wave(self.cluster.http, self.max_tokens, self.streams, fault), self.reference)
        info["watch"].join(150)
        out.fault = f"redis-server SIGKILLed, restarted empty {down:.1f}s later, under {self.streams} live streams"
        out.recovery_s = info.get("recovery_s")
        return out

    def _watch_registered(self, since: float, result: dict) -> threading.Thread:
        """In the background: from `since` (the fault's end) until every worker's record is in Redis again."""

        def run() -> None:
            time.sleep(max(0.0, since - time.monotonic()))
            while registered(self.redis.port) < 3:
                if time.monotonic() - since > 120:
                    return
                time.sleep(0.02)
            result["recovery_s"] = round(max(0.0, time.monotonic() - since), 2)

        t = threading.Thread(target=run, daemon=True)
        t.start()
        return t


def run_faults(model: str | None = None, streams: int = 16, max_tokens: int = 64, ttl_s: float = 3.0,
               stall_s: float = 2.0, scenarios: tuple[str, ...] = SCENARIOS, workdir: str | None = None,
               say: Callable[[str], None] = print) -> dict:
    """Start the cluster, take the fault-free reference, run each scenario; the result document."""
    if shutil.which("redis-server") is None:
        raise RuntimeError("tandem bench faults needs redis-server (the cluster's registry) on PATH")
    work = Path(workdir or tempfile.mkdtemp(prefix="tandem-faults-"))
    work.mkdir(parents=True, exist_ok=True)
    redis_srv = Redis(work).start()
    cluster = Cluster(work, model, f"redis://127.0.0.1:{redis_srv.port}/0?ttl_s={ttl_s}", stall_s)
    outcomes: list[Outcome] = []
    try:
        say(f"starting the cluster (logs in {cluster.log_dir})")
        cluster.start()
        ref = wave(cluster.http, max_tokens, streams)
        if any(text is None for _, text, _ in ref):
            raise RuntimeError(f"the fault-free reference run failed: {[e for _, _, e in ref if e][:3]}")
        bench = Bench(cluster, redis_srv, [text for _, text, _ in ref], streams, max_tokens, ttl_s, stall_s)
        for name in scenarios:
            say(f"scenario {name} ...")
            out = bench.run(name)
            outcomes.append(out)
            say(f"  {out.fault}: accepted {out.accepted}, completed {out.completed}, identical {out.identical}, "
                f"lost {out.lost}, recovery {out.recovery_s}s")
            wait_whole(cluster, time.monotonic())
        supervisor = [ln for ln in cluster.out.read_text(errors="replace").splitlines()
                      if "restart" in ln or "serving again" in ln]
    finally:
        cluster.stop()
        redis_srv.kill()
    return {"config": {"model": model or "embedded SmolLM2-135M", "layout": "1 prefill + 2 decode (tandem up)",
                       "registry": "redis (private redis-server)", "streams": streams, "max_tokens": max_tokens,
                       "ttl_s": ttl_s, "stall_s": stall_s, "greedy": True},
            "scenarios": [asdict(o) for o in outcomes], "supervisor_log": supervisor}
