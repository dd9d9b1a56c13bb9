"""The Python client and `tandem client` against a real split cluster (gateway + prefill + decode) with API keys.

Streams equal whole answers and the HTTP path; deadlines, cancel, retry on UNAVAILABLE only before the first
token, and auth failures (UNAUTHENTICATED / 401 with a clear message) at both front doors.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from concurrent import futures
from pathlib import Path

import grpc
import httpx
import pytest
from kit.cluster import start_up, write_layout
from kit.net import free_port

from services.client import AsyncClient, Client, Retry
from services.contracts.errors import DeadlineExceeded, Unauthenticated, Unavailable
from services.rpc.tandem.v1 import generation_pb2_grpc as pb_grpc

pytestmark = pytest.mark.slow
KEY = "test-key-1"
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    from kit.checkpoints import tiny_config, write_tiny_checkpoint

    d = tmp_path_factory.mktemp("client")
    tiny = write_tiny_checkpoint(d / "tiny", tiny_config(max_seq_len=4096))
    keys = d / "keys.txt"
    keys.write_text(f"# gateway keys\n{KEY}\nother-key\n")
    pools = [{"role": "prefill", "count": 1, "base_port": free_port()},
             {"role": "decode", "count": 1, "base_port": free_port()}]
    layout = write_layout(d / "layout.yaml", str(tiny), pools, free_port(), free_port(), name="client-split")
    old = os.environ.get("TANDEM_API_KEYS_FILE")
    os.environ["TANDEM_API_KEYS_FILE"] = str(keys)  # inherited by `tandem up` and its gateway
    try:
        up = start_up(layout, d / "logs")
    finally:
        os.environ.pop("TANDEM_API_KEYS_FILE") if old is None else os.environ.__setitem__("TANDEM_API_KEYS_FILE", old)
    yield up
    up.stop(signal.SIGKILL if up.proc.poll() is None else signal.SIGTERM)


def test_stream_generate_async_and_cli_agree(cluster) -> None:
    with Client(cluster.grpc, api_key=KEY, timeout=60) as c:
        deltas = list(c.stream(PROMPT, max_tokens=12, temperature=0))
        whole = c.generate(PROMPT, max_tokens=12, temperature=0)
        chat = c.generate(messages=[("user", "hi")], max_tokens=4, temperature=0)
    assert "".join(d.text for d in deltas) == whole.text and whole.finish_reason in ("stop", "length")
    assert deltas[-1].usage == whole.usage and whole.usage.completion_tokens == len(whole.timings["token_times_s"])
    assert len(whole.workers) == 2 and chat.usage.completion_tokens <= 4

    async def twice() -> list[str]:
        async with AsyncClient(cluster.grpc, api_key=KEY, timeout=60) as ac:
            got = await asyncio.gather(*(ac.generate(PROMPT, max_tokens=12, temperature=0) for _ in range(2)))
        return [g.text for g in got]

    assert asyncio.run(twice()) == [whole.text] * 2
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "TANDEM_API_KEY": KEY}
    for via in (["--target", cluster.grpc], ["--http", cluster.http]):
        out = subprocess.run([sys.executable, "-m", "services.cli", "client", PROMPT, "--max-tokens", "12",
                              "--temperature", "0", *via], capture_output=True, text=True, env=env, timeout=120)
        assert out.returncode == 0, out.stderr
        assert out.stdout == whole.text, (via, out.stdout, whole.text)


def test_wrong_or_missing_key_is_refused_with_a_clear_message(cluster) -> None:
    for key in (None, "wrong"):
        with Client(cluster.grpc, api_key=key or "", timeout=10) as c, pytest.raises(Unauthenticated) as err:
            c.generate(PROMPT, max_tokens=2)
        assert ("missing API key" if key is None else "invalid API key") in err.value.message
        assert cluster.grpc in err.value.message
        headers = {"authorization": f"Bearer {key}"} if key else {}
        r = httpx.post(f"{cluster.http}/v1/completions", json={"model": "", "prompt": "hi"}, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", r.text
    assert httpx.get(f"{cluster.http}/health").status_code == 200  # probes stay open
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "TANDEM_API_KEY": "wrong"}
    out = subprocess.run([sys.executable, "-m", "services.cli", "client", "hi", "--target", cluster.grpc],
                         capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 2 and out.stdout == "" and "invalid API key" in out.stderr


def test_deadline_is_deadline_exceeded(cluster) -> None:
    with Client(cluster.grpc, api_key=KEY) as c, pytest.raises(DeadlineExceeded):
        c.generate(PROMPT, max_tokens=3000, ignore_eos=True, timeout=0.5)


def test_cancel_ends_the_stream_and_frees_the_decode_worker(cluster) -> None:
    with Client(cluster.grpc, api_key=KEY, timeout=60) as c:
        stream = c.stream(PROMPT, max_tokens=3000, ignore_eos=True)
        got = []
        for delta in stream:
            got.append(delta)
            if len(got) == 3:
                stream.cancel()
        assert len(got) == 3 and got[-1].finish_reason is None
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        metrics = httpx.get(f"{cluster.http}/metrics").text
        if 'tandem_gateway_requests_total{api="grpc",outcome="cancelled"} 1.0' in metrics:
            break
        time.sleep(0.2)
    assert 'outcome="cancelled"} 1.0' in metrics


class _Flaky(pb_grpc.GenerationServicer):
    """In front of the real gateway: UNAVAILABLE for the first `fail` calls, or after the first token."""

    def __init__(self, upstream: str, fail: int = 0, fail_after_first: bool = False) -> None:
        self.stub = pb_grpc.GenerationStub(grpc.insecure_channel(upstream))
        self.fail, self.fail_after_first, self.calls = fail, fail_after_first, 0

    def Generate(self, request, context):  # noqa: N802
        self.calls += 1
        if self.calls <= self.fail:
            context.abort(grpc.StatusCode.UNAVAILABLE, "no healthy worker (planted)")
        md = tuple((k, v) for k, v in context.invocation_metadata() if k in ("authorization", "x-request-id"))
        for i, msg in enumerate(self.stub.Generate(request, metadata=md, timeout=30)):
            yield msg
            if self.fail_after_first and i == 0:
                context.abort(grpc.StatusCode.UNAVAILABLE, "worker died mid-stream (planted)")


def _proxy(servicer: _Flaky) -> tuple[grpc.Server, str]:
    server = grpc.server(futures.ThreadPoolExecutor(4))
    pb_grpc.add_GenerationServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, f"127.0.0.1:{port}"


def test_unavailable_is_retried_only_before_the_first_token(cluster) -> None:
    flaky = _Flaky(cluster.grpc, fail=2)
    server, addr = _proxy(flaky)
    try:
        with Client(addr, api_key=KEY, timeout=60, retry=Retry(attempts=3, backoff_s=0.05)) as c:
            stream = c.stream(PROMPT, max_tokens=4, temperature=0)
            assert "".join(d.text for d in stream) and stream.attempts == 3 and flaky.calls == 3
        flaky.calls, flaky.fail = 0, 5
        with Client(addr, api_key=KEY, timeout=60, retry=Retry(attempts=2, backoff_s=0.05)) as c:
            with pytest.raises(Unavailable, match="planted"):
                c.generate(PROMPT, max_tokens=4)
        assert flaky.calls == 2
        flaky.calls, flaky.fail, flaky.fail_after_first = 0, 0, True
        with Client(addr, api_key=KEY, timeout=60, retry=Retry(attempts=3, backoff_s=0.05)) as c:
            stream, got = c.stream(PROMPT, max_tokens=8, temperature=0), []
            with pytest.raises(Unavailable, match="mid-stream"):
                got.extend(stream)
        assert flaky.calls == 1 and stream.attempts == 1 and len(got) == 1  # no retry once a token was sent
    finally:
        server.stop(0)


def test_async_cancel_and_deadline(cluster) -> None:
    async def run() -> None:
        async with AsyncClient(cluster.grpc, api_key=KEY, timeout=60) as ac:
            stream, n = ac.stream(PROMPT, max_tokens=3000, ignore_eos=True), 0
            async for _ in stream:
                n += 1
                if n == 2:
                    stream.cancel()
            assert n == 2
            with pytest.raises(DeadlineExceeded):
                await ac.generate(PROMPT, max_tokens=3000, ignore_eos=True, timeout=0.5)

    asyncio.run(run())


def test_example_script_streams_from_the_split_cluster(cluster) -> None:
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run([sys.executable, str(root / "examples/client_stream.py"), PROMPT, "--target", cluster.grpc,
                          "--max-tokens", "6", "--api-key", KEY], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "chat: " in out.stdout and "async: " in out.stdout and "TTFT" in out.stderr
