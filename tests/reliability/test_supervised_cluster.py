"""`tandem up` with a Redis registry, over real processes: Redis paused and then killed + restarted under load
costs zero requests; a SIGKILLed decode worker is restarted, re-registers and takes work again while every
other process keeps serving."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest
from kit.cluster import alive, child_named, start_up, write_layout
from kit.net import free_port
from kit.redisd import RedisServer

pytestmark = pytest.mark.slow
TTL = 1.0
PROMPTS = ["Hello world, hello", "The capital of France is", "def main():\n    return", "one two three"]


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory):
    srv = RedisServer(free_port(), tmp_path_factory.mktemp("redis")).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def cluster(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory):
    from kit.checkpoints import tiny_config, write_tiny_checkpoint

    d = tmp_path_factory.mktemp("supervised")
    tiny = write_tiny_checkpoint(d / "tiny", tiny_config(max_seq_len=1024))
    ports = {"prefill": free_port(), "decode0": free_port(), "decode1": free_port()}
    pools = [{"role": "prefill", "count": 1, "base_port": ports["prefill"]},
             {"role": "decode", "count": 1, "base_port": ports["decode0"]},
             {"role": "decode", "count": 1, "base_port": ports["decode1"]}]
    layout = write_layout(d / "layout.yaml", str(tiny), pools, free_port(), free_port(), name="supervised",
                          registry=f"{redis_server.url}?ttl_s={TTL}")
    up = start_up(layout, d / "logs")
    up.ports = ports  # type: ignore[attr-defined]
    yield up
    up.stop(signal.SIGKILL if up.proc.poll() is None else signal.SIGTERM)


def complete(up, prompt: str, max_tokens: int = 12) -> str:
    body = {"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    r = httpx.post(f"{up.http}/v1/completions", json=body, timeout=60)
    r.raise_for_status()
    return r.json()["choices"][0]["text"]


def registered(srv: RedisServer) -> set[str]:
    return {k.decode().rsplit(":", 2)[-2] + ":" + k.decode().rsplit(":", 1)[-1]
            for k in srv.client().keys("tandem:worker:*") if srv.client().get(k) != b"gone"}


class Load:
    """`threads` clients sending greedy requests back to back; every answer is checked against `expected`."""

    def __init__(self, up, expected: dict[str, str], threads: int = 3) -> None:
        self.up, self.expected = up, expected
        self.ok = self.wrong = 0
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)]

    def _run(self, i: int) -> None:
        n = i
        while not self._stop.is_set():
            prompt = PROMPTS[n % len(PROMPTS)]
            n += 1
            try:
                text = complete(self.up, prompt)
            except Exception as exc:  # noqa: BLE001 - every failure is counted and shown
                self.errors.append(repr(exc))
                continue
            if text == self.expected[prompt]:
                self.ok += 1
            else:
                self.wrong += 1

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(60)


def test_redis_paused_then_killed_under_load_fails_no_request(cluster, redis_server: RedisServer) -> None:
    expected = {p: complete(cluster, p) for p in PROMPTS}
    assert len(registered(redis_server)) == 3
    with Load(cluster, expected) as load:
        time.sleep(1.0)
        redis_server.pause(3 * TTL)  # longer than a heartbeat TTL
        time.sleep(3 * TTL + 0.5)
        redis_server.kill()
        time.sleep(2 * TTL)
        redis_server.start()  # empty: every worker must re-register
        deadline = time.monotonic() + 5
        while len(registered(redis_server)) < 3 and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(1.0)
    assert load.errors == [] and load.wrong == 0, load.errors[:3]
    assert load.ok >= 6
    assert len(registered(redis_server)) == 3


def test_sigkilled_decode_worker_is_restarted_and_serves_again(cluster, redis_server: RedisServer) -> None:
    pid = cluster.proc.pid
    addr = f"127.0.0.1:{cluster.ports['decode1']}"
    victim = child_named(pid, "--address", addr)
    others = {k: child_named(pid, "--address", f"127.0.0.1:{cluster.ports[k]}")
              for k in ("prefill", "decode0")}
    others["gateway"] = next(k for k in cluster.children() if k not in (victim, *others.values()))
    expected = {p: complete(cluster, p) for p in PROMPTS}
    os.kill(victim, signal.SIGKILL)
    time.sleep(TTL + 0.3)  # its record lapses (no migration needed for requests sent from here on)
    for p in PROMPTS:  # the cluster serves on with the other decode worker
        assert complete(cluster, p) == expected[p]
    deadline = time.monotonic() + 120
    while addr not in registered(redis_server):
        assert time.monotonic() < deadline, "the restarted worker never re-registered"
        time.sleep(0.2)
    restarted = child_named(pid, "--address", addr)
    assert restarted != victim
    out = Path(f"{cluster.log_dir}-up.out").read_text()
    assert "exited with code -9; restarting" in out
    # concurrent requests spread over both decode workers: the new process takes work, with the same output
    for _ in range(5):
        texts: dict[int, str] = {}
        threads = [threading.Thread(target=lambda i=i, p=p, texts=texts: texts.__setitem__(i, complete(cluster, p)))
                   for i, p in enumerate(PROMPTS * 2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert texts == {i: expected[p] for i, p in enumerate(PROMPTS * 2)}
        if kv_received(cluster.ports["decode1"]) > 0:
            break
    else:
        pytest.fail("the restarted worker got no work")
    assert all(alive(p) for p in others.values()), "another process stopped"
    assert {k: child_named(pid, "--address", f"127.0.0.1:{cluster.ports[k]}")
            for k in ("prefill", "decode0")} == {k: others[k] for k in ("prefill", "decode0")}


def kv_received(grpc_port: int) -> float:
    text = httpx.get(f"http://127.0.0.1:{grpc_port + 1000}/metrics", timeout=5).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("tandem_worker_kv_transfer_bytes_total") and 'direction="received"' in line)
