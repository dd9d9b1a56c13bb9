"""Prefill and decode workers as separate processes on one GPU, KV over CUDA IPC (skipped without CUDA).

Real worker processes, real gRPC on loopback: the IPC pair's greedy tokens equal the mixed worker's (one
process, no transfer) with the layer-wise push and with the push after the pass, alone and batched; a decode
worker with kv_path grpc, or on another GPU, refuses and the prefill worker falls back to bytes; hand-made
PushShared streams from this process check the receiver's validation and that its copy equals the bytes
path's.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch
from kit.net import free_port

from services.engine.sampling import SamplingParams
from services.grpcutil import channel, wait_healthy
from services.kv.ipc import SETTLED_KEY, device_uuid, host_id, share
from services.kv.wire import KVSpec, encode
from services.rpc.tandem.v1 import worker_pb2 as pb
from services.rpc.tandem.v1 import worker_pb2_grpc as rpc
from services.workers.client import WorkerClient
from services.workers.modelspec import random_spec

pytestmark = [pytest.mark.gpu, pytest.mark.slow]
SPEC = random_spec(vocab_size=512, dim=256, n_layers=4, n_heads=4, n_kv_heads=2, hidden_dim=512, max_seq_len=1024,
                   eos_ids=[1], dtype="float32")
GREEDY = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
PROMPTS = [[3], [5, 6, 7, 8, 9, 10, 11], [(i * 37) % 500 + 2 for i in range(100)],
           [(i * 7919) % 500 + 2 for i in range(700)]]


class Workers:
    """Worker processes of one random float32 model; `gpus` is each one's CUDA_VISIBLE_DEVICES."""

    def __init__(self, tmp: Path, specs: dict[str, tuple[list[str], str]]) -> None:
        self.tmp, self.addr, self.procs, self.clients = tmp, {}, {}, {}
        for name, (args, gpus) in specs.items():
            self.addr[name] = f"127.0.0.1:{free_port()}"
            log = (tmp / f"{name}.log").open("w")
            self.procs[name] = subprocess.Popen(
                [sys.executable, "-m", "services.workers.server", *args, "--address", self.addr[name], "--model", SPEC,
                 "--device", "cuda", "--max-batch", "8"], stderr=log, env={**os.environ, "CUDA_VISIBLE_DEVICES": gpus})
        for name in specs:
            try:
                wait_healthy(self.addr[name], 300)
            except TimeoutError:
                raise AssertionError(f"{name} did not start:\n{self.log(name)[-3000:]}") from None
            self.clients[name] = WorkerClient(self.addr[name])

    def log(self, name: str) -> str:
        path = self.tmp / f"{name}.log"
        return path.read_text() if path.exists() else ""

    def stop(self) -> None:
        for c in self.clients.values():
            c.close()
        for p in self.procs.values():
            p.terminate()
        for name, p in self.procs.items():
            assert p.wait(30) == 0, f"{name} did not stop cleanly:\n{self.log(name)[-3000:]}"


@pytest.fixture(scope="module")
def workers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Workers]:
    w = Workers(tmp_path_factory.mktemp("ipc"), {
        "decode": (["decode", "--kv-path", "auto"], "0"),
        "mixed": (["mixed"], "0"),
        "prefill": (["prefill", "--kv-path", "ipc"], "0"),
        "prefill_serial": (["prefill", "--kv-path", "ipc", "--no-kv-overlap"], "0"),
        "decode_grpc": (["decode", "--kv-path", "grpc"], "0"),
    })
    yield w
    w.stop()


def mixed_tokens(w: Workers, prompt: list[int]) -> list[int]:
    first, rest = w.clients["mixed"].generate(None, prompt, GREEDY, timeout=120)
    return [first.first_token] + [e.token_id for e in rest]


def split_tokens(w: Workers, prefill: str, decode: str, prompt: list[int], path: str) -> list[int]:
    r = w.clients[prefill].prefill(None, prompt, GREEDY, w.addr[decode], timeout=120)
    assert r.kv_path == path, (r, w.log(prefill)[-2000:])
    assert r.kv_bytes == len(prompt) * 4 * 2 * 2 * 64 * 4  # tokens x layers x K,V x kv heads x head dim x f32
    return [r.first_token] + [e.token_id for e in w.clients[decode].decode(None, r.handle, r.first_token, GREEDY,
                                                                              timeout=120)]


def wait_free(client: WorkerClient, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = client.info()
        if info.kv_free_bytes == info.kv_total_bytes and not info.live_requests and not info.waiting_requests:
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("prefill", ["prefill", "prefill_serial"])
def test_ipc_pair_greedy_tokens_equal_the_mixed_worker(workers: Workers, prefill: str) -> None:
    for prompt in PROMPTS:
        assert split_tokens(workers, prefill, "decode", prompt, "ipc") == mixed_tokens(workers, prompt), len(prompt)
    assert "KV received over CUDA IPC" in workers.log("decode")
    assert wait_free(workers.clients["decode"])


def test_batched_prefill_shares_one_buffer_with_every_push(workers: Workers) -> None:
    expected = {i: mixed_tokens(workers, p) for i, p in enumerate(PROMPTS)}
    got: dict[int, list[int]] = {}

    def run(i: int) -> None:
        got[i] = split_tokens(workers, "prefill", "decode", PROMPTS[i % len(PROMPTS)], "ipc")

    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert {i: got[i] for i in range(8)} == {i: expected[i % len(PROMPTS)] for i in range(8)}
    assert wait_free(workers.clients["decode"])


def test_refused_ipc_falls_back_to_grpc_with_a_log_line(workers: Workers) -> None:
    for prompt in PROMPTS[1:3]:  # the first push is refused and resent as bytes, the next goes as bytes at once
        assert split_tokens(workers, "prefill", "decode_grpc", prompt, "grpc") == mixed_tokens(workers, prompt)
    log = workers.log("prefill")
    assert log.count("decode worker refused CUDA IPC") == 1 and "over gRPC only (kv_path grpc)" in log
    assert "KV over CUDA IPC refused" in workers.log("decode_grpc")
    assert wait_free(workers.clients["decode_grpc"])
    # the IPC pair is unaffected: refusals are per decode address
    assert split_tokens(workers, "prefill", "decode", PROMPTS[2], "ipc") == mixed_tokens(workers, PROMPTS[2])


def _shared_push(addr: str, chunks: list[pb.KVSharedChunk]) -> pb.KVReceipt:
    with channel(addr) as ch:
        call = ch.stream_unary("/tandem.v1.KVTransfer/PushShared", request_serializer=pb.KVSharedChunk.SerializeToString,
                               response_deserializer=pb.KVReceipt.FromString)
        return call(iter(chunks), timeout=30)


def test_hand_made_shared_push_is_validated_and_equals_the_bytes_path(workers: Workers) -> None:
    info = workers.clients["decode"].info()
    n, layers = 37, 4
    spec = KVSpec(info.fingerprint, layers, "float32", n, 2, 64)
    g = torch.Generator(device="cuda").manual_seed(0)
    k = torch.randn((layers, 2, 64, 2, 64), device="cuda", generator=g)  # [layers, slots, capacity, heads, dim]
    v = torch.randn((layers, 2, 64, 2, 64), device="cuda", generator=g)
    torch.cuda.synchronize()
    slot, item = 1, 4

    def stream(gen: int = 7, order: list[int] | None = None, k_shift: int = 0) -> list[pb.KVSharedChunk]:
        head = pb.KVSharedHeader(kv=spec.header("hand").header, host_id=host_id(), pid=os.getpid(),
                                 device_uuid=device_uuid(0), k=share(k), v=share(v), generation=7)
        out = [pb.KVSharedChunk(header=head)]
        for i in order if order is not None else range(layers):
            out.append(pb.KVSharedChunk(layer=pb.KVSharedLayer(
                layer=i, generation=gen, k_offset=k[i, slot, :n].storage_offset() * item + k_shift,
                v_offset=v[i, slot, :n].storage_offset() * item)))
        return out

    cases = {"out of order": stream(order=[1]), "generation 8 is not this push's 7": stream(gen=8),
             "do not fit the shared storage": stream(k_shift=k.nbytes), "ended early": stream(order=[0, 1])}
    for message, chunks in cases.items():
        with pytest.raises(grpc.RpcError) as exc:
            _shared_push(workers.addr["decode"], chunks)
        assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in exc.value.details(), message
        assert any(key == SETTLED_KEY for key, _ in exc.value.trailing_metadata() or ())  # it had opened them

    shared = _shared_push(workers.addr["decode"], stream())
    assert shared.bytes == spec.nbytes
    cpu = [(k[i, slot, :n].cpu(), v[i, slot, :n].cpu()) for i in range(layers)]
    with channel(workers.addr["decode"]) as ch:
        as_bytes = rpc.KVTransferStub(ch).Push(encode(spec, "hand-bytes", cpu), timeout=30)
    c = workers.clients["decode"]
    out = [[e.token_id for e in c.decode(None, h, 5, GREEDY, timeout=60)] for h in (shared.handle, as_bytes.handle)]
    assert out[0] == out[1] and len(out[0]) == GREEDY.max_tokens - 1
    assert wait_free(c)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_kv_on_another_gpu_goes_over_grpc(workers: Workers, tmp_path: Path) -> None:
    """A decode worker on GPU 1 that also sees GPU 0 (CUDA_VISIBLE_DEVICES=1,0) refuses the prefill worker's
    handles on GPU 0 (opening them and copying over peer access crashed it) and gets the bytes instead."""
    peer = Workers(tmp_path, {"decode_peer": (["decode"], "1,0")})
    try:
        peer.addr.update(workers.addr)
        peer.clients.update(workers.clients)
        for prompt in PROMPTS[1:3]:
            assert split_tokens(peer, "prefill", "decode_peer", prompt, "grpc") == mixed_tokens(workers, prompt)
        assert "not this decode worker's GPU" in peer.log("decode_peer")
    finally:
        for name in workers.clients:
            peer.clients.pop(name)
        peer.stop()
