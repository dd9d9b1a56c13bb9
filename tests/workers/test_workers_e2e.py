"""Prefill -> KV transfer -> decode over real worker processes and real gRPC on loopback."""

from __future__ import annotations

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

from services.contracts import errors
from services.engine.sampling import SamplingParams
from services.grpcutil import channel, wait_healthy
from services.kv.wire import KVSpec, dtype_name, encode
from services.rpc.tandem.v1 import worker_pb2 as pb
from services.rpc.tandem.v1 import worker_pb2_grpc as rpc
from services.workers.client import WorkerClient
from services.workers.modelspec import load_model

pytestmark = pytest.mark.slow
SPEC = "random:tiny"
LEASE_S = 2.0
GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


class WorkerPair:
    """A prefill worker and a mixed worker of the random tiny model, as subprocesses on free ports."""

    def __init__(self, tmp: Path) -> None:
        self.prefill_addr = f"127.0.0.1:{free_port()}"
        self.decode_addr = f"127.0.0.1:{free_port()}"  # a mixed worker: decode target and one-process path
        self.decode_log = tmp / "decode.log"
        self.metrics_port = free_port()
        common = [sys.executable, "-m", "services.workers.server", "--model", SPEC]
        self.procs = [
            subprocess.Popen([*common, "prefill", "--address", self.prefill_addr, "--max-batch-tokens", "64"],
                             stderr=subprocess.DEVNULL),
            subprocess.Popen([*common, "mixed", "--address", self.decode_addr, "--kv-lease-s", str(LEASE_S),
                              "--kv-stall-s", "1.0", "--metrics-port", str(self.metrics_port)], stderr=self.decode_log.open("w")),
        ]
        for addr in (self.prefill_addr, self.decode_addr):
            wait_healthy(addr, 120)
        self.prefill = WorkerClient(self.prefill_addr)
        self.decode = WorkerClient(self.decode_addr)

    def stop(self) -> None:
        self.prefill.close()
        self.decode.close()
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            assert p.wait(15) == 0  # SIGTERM is a clean shutdown


@pytest.fixture(scope="module")
def worker_pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerPair]:
    c = WorkerPair(tmp_path_factory.mktemp("workers"))
    yield c
    c.stop()


@pytest.fixture(scope="module")
def random_tiny_engine():
    """The workers' model (`--model random:tiny`) loaded in this process."""
    return load_model(SPEC)


def reference(engine, prompt: list[int], n: int) -> list[int]:
    """Greedy generation in this process with the same model: the single-process truth."""
    kv = engine.new_kv(1, len(prompt) + n)
    out = [int(engine.prefill([prompt], kv, [0])[0].argmax())]
    while len(out) < n:
        out.append(int(engine.decode([out[-1]], kv, torch.tensor([0]))[0].argmax()))
    return out


PROMPTS = [[3], [5, 6, 7, 8, 9, 10, 11], list(range(2, 40)), [(i * 37) % 250 + 2 for i in range(100)]]


def split_generate(c: WorkerPair, rid: str, prompt: list[int], params: SamplingParams = GREEDY) -> list[int]:
    r = c.prefill.prefill(rid, prompt, params, c.decode_addr, timeout=30)
    assert r.prompt_tokens == len(prompt) and r.handle and r.finished is None
    assert r.kv_bytes == len(prompt) * 4 * 2 * 2 * 16 * 4  # tokens x layers x K,V x kv_heads x head_dim x f32
    assert r.kv_path == "grpc"  # kv_path auto with the model on CPU: bytes (CUDA IPC needs CUDA)
    return [r.first_token] + [e.token_id for e in c.decode.decode(rid, r.handle, r.first_token, params, timeout=30)]


def wait_free(c: WorkerPair, timeout: float = 5.0):
    deadline = time.monotonic() + timeout
    while True:
        info = c.decode.info()
        if (info.kv_free_bytes == info.kv_total_bytes and info.live_requests == 0 and info.waiting_requests == 0) \
                or time.monotonic() > deadline:
            return info
        time.sleep(0.05)


def test_split_path_matches_single_process_engine(worker_pair: WorkerPair, random_tiny_engine) -> None:
    for i, prompt in enumerate(PROMPTS):
        assert split_generate(worker_pair, f"split-{i}", prompt) == reference(random_tiny_engine, prompt, GREEDY.max_tokens)


def test_concurrent_requests_batch_and_still_match(worker_pair: WorkerPair, random_tiny_engine) -> None:
    results: dict[int, list[int]] = {}

    def run(i: int) -> None:
        results[i] = split_generate(worker_pair, f"conc-{i}", PROMPTS[i % len(PROMPTS)])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(6):
        assert results[i] == reference(random_tiny_engine, PROMPTS[i % len(PROMPTS)], GREEDY.max_tokens)


def test_mixed_worker_matches_and_reports_finish(worker_pair: WorkerPair, random_tiny_engine) -> None:
    prompt = PROMPTS[2]
    first, events = worker_pair.decode.generate("mixed-1", prompt, GREEDY, timeout=30)
    events = list(events)
    assert [first.first_token] + [e.token_id for e in events] == reference(random_tiny_engine, prompt, GREEDY.max_tokens)
    assert [e.finish_reason for e in events] == [None] * (len(events) - 1) + ["length"]
    assert events[0].first_decode_s is not None and events[0].first_decode_s > 0
    one = SamplingParams(max_tokens=1, temperature=0)
    r = worker_pair.prefill.prefill("one", prompt, one, "", timeout=30)  # finished by the first token: no push
    assert r.finished == "length" and r.handle == "" and r.kv_bytes == 0


def test_cancel_frees_slot_and_kv(worker_pair: WorkerPair) -> None:
    long = SamplingParams(max_tokens=400, temperature=0, ignore_eos=True)
    r = worker_pair.prefill.prefill("cancel-1", PROMPTS[3], long, worker_pair.decode_addr, timeout=30)
    stream = worker_pair.decode.decode("cancel-1", r.handle, r.first_token, long, timeout=60)
    got = [next(stream).token_id for _ in range(3)]
    busy = worker_pair.decode.info()
    assert len(got) == 3 and busy.live_requests == 1 and busy.kv_free_bytes < busy.kv_total_bytes
    stream.close()  # the client goes away mid-stream
    info = wait_free(worker_pair)
    assert info.live_requests == 0 and info.kv_free_bytes == info.kv_total_bytes


def test_unclaimed_kv_is_freed_when_its_lease_expires(worker_pair: WorkerPair) -> None:
    r = worker_pair.prefill.prefill("lease-1", PROMPTS[3], GREEDY, worker_pair.decode_addr, timeout=30)
    held = worker_pair.decode.info()
    assert held.kv_total_bytes - held.kv_free_bytes >= r.kv_bytes and held.waiting_requests == 1
    info = wait_free(worker_pair, LEASE_S + 3)
    assert info.kv_free_bytes == info.kv_total_bytes
    with pytest.raises(errors.NotFound):
        list(worker_pair.decode.decode("lease-1", r.handle, r.first_token, GREEDY, timeout=10))
    assert "lease expired" in worker_pair.decode_log.read_text()


def test_release_frees_at_once(worker_pair: WorkerPair) -> None:
    r = worker_pair.prefill.prefill("rel-1", PROMPTS[1], GREEDY, worker_pair.decode_addr, timeout=30)
    assert worker_pair.decode.release(r.handle) is True
    assert worker_pair.decode.release(r.handle) is False
    assert wait_free(worker_pair, 0.5).kv_free_bytes == worker_pair.decode.info().kv_total_bytes


def _push(addr: str, chunks: list[pb.KVChunk], rid: str, timeout: float = 10) -> pb.KVReceipt:
    with channel(addr) as ch:
        return rpc.KVTransferStub(ch).Push(iter(chunks), timeout=timeout, metadata=(("x-request-id", rid),))


def _good_chunks(engine, n: int = 5, fingerprint: str | None = None) -> list[pb.KVChunk]:
    cfg = engine.cfg
    spec = KVSpec(fingerprint or engine.fingerprint, cfg.n_layers, dtype_name(engine.dtype), n, cfg.n_kv_heads,
                  cfg.head_dim)
    layers = [(torch.randn(n, cfg.n_kv_heads, cfg.head_dim), torch.randn(n, cfg.n_kv_heads, cfg.head_dim))
              for _ in range(cfg.n_layers)]
    return list(encode(spec, "raw", layers))


def test_corrupt_or_misshapen_kv_is_rejected_and_logged(worker_pair: WorkerPair, random_tiny_engine) -> None:
    ok = _push(worker_pair.decode_addr, _good_chunks(random_tiny_engine), "raw-ok")
    assert ok.bytes == 5 * 4 * 2 * 2 * 16 * 4 and worker_pair.decode.release(ok.handle)

    bad_crc = _good_chunks(random_tiny_engine)
    bad_crc[3].piece.crc32 ^= 1
    bad_shape = _good_chunks(random_tiny_engine)
    bad_shape[2].piece.shape[1] = 3
    flipped = _good_chunks(random_tiny_engine)
    flipped[4].piece.data = bytes([flipped[4].piece.data[0] ^ 0xFF]) + flipped[4].piece.data[1:]
    cases = {"crc-field": bad_crc, "shape": bad_shape, "flipped-bit": flipped,
             "fingerprint": _good_chunks(random_tiny_engine, fingerprint="0" * 16), "truncated": _good_chunks(random_tiny_engine)[:-1]}
    for name, chunks in cases.items():
        with pytest.raises(grpc.RpcError) as exc:
            _push(worker_pair.decode_addr, chunks, f"raw-{name}")
        assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT, name
    log = worker_pair.decode_log.read_text()
    assert "checksum mismatch" in log and "shape [5, 3, 16] does not match" in log
    assert "model_fingerprint" in log and "ended early" in log and '"request_id": "raw-shape"' in log
    assert wait_free(worker_pair).kv_free_bytes == worker_pair.decode.info().kv_total_bytes


def _shared_header(engine, n: int = 5, fingerprint: str | None = None) -> pb.KVSharedChunk:
    from services.kv.ipc import host_id

    cfg = engine.cfg
    spec = KVSpec(fingerprint or engine.fingerprint, cfg.n_layers, dtype_name(engine.dtype), n, cfg.n_kv_heads,
                  cfg.head_dim)
    junk = pb.CudaStorageHandle(handle=b"\0" * 64, size_bytes=1 << 20, ref_counter_handle=b"/nonexistent")
    return pb.KVSharedChunk(header=pb.KVSharedHeader(kv=spec.header("shared").header, host_id=host_id(), pid=1,
                                                     device_uuid="GPU-none", k=junk, v=junk, generation=1))


def test_shared_push_to_a_cpu_worker_is_refused_before_anything_is_held(worker_pair: WorkerPair,
                                                                         random_tiny_engine) -> None:
    """PushShared (CUDA IPC handles) to a worker whose model is on CPU: FAILED_PRECONDITION (the sender's cue to
    push bytes), nothing reserved; a header that does not match the model is INVALID_ARGUMENT as for bytes."""
    from services.kv.ipc import parse_shared

    def push_shared(chunks: list[pb.KVSharedChunk], rid: str) -> None:
        with channel(worker_pair.decode_addr) as ch:
            call = ch.stream_unary("/tandem.v1.KVTransfer/PushShared",
                                   request_serializer=pb.KVSharedChunk.SerializeToString,
                                   response_deserializer=pb.KVReceipt.FromString)
            call(iter(chunks), timeout=10, metadata=(("x-request-id", rid),))

    with pytest.raises(grpc.RpcError) as exc:
        push_shared([_shared_header(random_tiny_engine)], "shared-cpu")
    assert exc.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "model is on cpu, not CUDA" in exc.value.details()
    assert not any(k == "tandem-ipc-settled" for k, _ in exc.value.trailing_metadata() or ())  # sender releases
    with pytest.raises(grpc.RpcError) as exc:
        push_shared([_shared_header(random_tiny_engine, fingerprint="0" * 16)], "shared-fingerprint")
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "model_fingerprint" in exc.value.details()
    with pytest.raises(grpc.RpcError) as exc:
        push_shared([pb.KVSharedChunk(layer=pb.KVSharedLayer(layer=0))], "shared-no-header")
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "must start with a header" in exc.value.details()
    assert isinstance(parse_shared(b"\xff\xff\xff"), str)
    assert "KV over CUDA IPC refused" in worker_pair.decode_log.read_text()
    assert wait_free(worker_pair).kv_free_bytes == worker_pair.decode.info().kv_total_bytes


def test_stalled_push_fails_and_frees_memory(worker_pair: WorkerPair, random_tiny_engine) -> None:
    chunks = _good_chunks(random_tiny_engine, n=50)

    def stall() -> Iterator[pb.KVChunk]:
        yield from chunks[:3]
        time.sleep(4)  # longer than the decode worker's --kv-stall-s 1.0

    t0 = time.monotonic()
    with channel(worker_pair.decode_addr) as ch, pytest.raises(grpc.RpcError) as exc:
        rpc.KVTransferStub(ch).Push(stall(), timeout=20)
    assert exc.value.code() == grpc.StatusCode.CANCELLED and time.monotonic() - t0 < 10
    assert wait_free(worker_pair).kv_free_bytes == worker_pair.decode.info().kv_total_bytes
    assert "push stalled" in worker_pair.decode_log.read_text()


def test_prefill_push_to_a_silent_peer_times_out(worker_pair: WorkerPair) -> None:
    import socket

    with socket.socket() as silent:  # accepts TCP but never speaks HTTP/2
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        addr = f"127.0.0.1:{silent.getsockname()[1]}"
        t0 = time.monotonic()
        with pytest.raises((errors.DeadlineExceeded, errors.Unavailable)):
            worker_pair.prefill.prefill("silent", PROMPTS[1], GREEDY, addr, timeout=20, kv_timeout=1.0)
        assert time.monotonic() - t0 < 10
    assert worker_pair.prefill.info().pending_prompt_tokens == 0


@pytest.mark.parametrize("params, prompt, field", [
    (SamplingParams(temperature=-1.0), [1, 2], "temperature"),
    (SamplingParams(top_p=0.0), [1, 2], "top_p"),
    (SamplingParams(max_tokens=4), [], "empty"),
    (SamplingParams(max_tokens=4), [999], "vocabulary"),
    (SamplingParams(max_tokens=4), [2] * 600, "context length"),
])
def test_bad_params_are_invalid_argument(worker_pair: WorkerPair, params: SamplingParams, prompt: list[int], field: str) -> None:
    from services.workers.client import sampling_to_pb

    req = pb.PrefillRequest(request_id="bad", prompt_ids=prompt, decode_address=worker_pair.decode_addr)
    req.sampling.CopyFrom(sampling_to_pb(SamplingParams()))
    req.sampling.temperature, req.sampling.top_p, req.sampling.max_tokens = params.temperature, params.top_p, params.max_tokens
    with channel(worker_pair.prefill_addr) as ch, pytest.raises(grpc.RpcError) as exc:
        rpc.PrefillStub(ch).Prefill(req, timeout=10)
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT and field in exc.value.details()


def test_wrong_role_unknown_handle_and_missing_address(worker_pair: WorkerPair) -> None:
    with pytest.raises(errors.InvalidArgument, match="prefill worker"):
        worker_pair.prefill.generate("x", [1, 2], GREEDY, timeout=10)
    with pytest.raises(errors.NotFound, match="handle"):
        list(worker_pair.decode.decode("x", "no-such-handle", 3, GREEDY, timeout=10))
    with pytest.raises(errors.InvalidArgument, match="decode_address"):
        worker_pair.prefill.prefill("x", [1, 2], GREEDY, "", timeout=10)
    with pytest.raises(errors.InvalidArgument, match="max_tokens"):
        worker_pair.prefill.prefill("x", [1, 2], SamplingParams(max_tokens=0), worker_pair.decode_addr, timeout=10)


def test_metrics_reflection_and_info(worker_pair: WorkerPair) -> None:
    import urllib.request

    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    split_generate(worker_pair, "metrics-1", PROMPTS[1])
    text = urllib.request.urlopen(f"http://127.0.0.1:{worker_pair.metrics_port}/metrics", timeout=5).read().decode()
    received = [line for line in text.splitlines()
                if line.startswith("tandem_worker_kv_transfer_bytes_total") and 'direction="received"' in line]
    assert received and float(received[0].split()[-1]) > 0
    assert "tandem_worker_kv_free_bytes" in text and "tandem_worker_running_requests" in text
    with channel(worker_pair.decode_addr) as ch:
        names = set(ProtoReflectionDescriptorDatabase(ch).get_services())
    assert {"tandem.v1.Prefill", "tandem.v1.Decode", "tandem.v1.KVTransfer", "tandem.v1.Worker",
            "grpc.health.v1.Health"} <= names
    info = worker_pair.prefill.info()
    assert info.role == "prefill" and info.fingerprint == worker_pair.decode.info().fingerprint
    assert (info.max_seq_len, info.vocab_size, info.kv_dtype) == (512, 256, "float32")


def test_health_is_not_serving_until_the_model_is_loaded(port: int) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from services.workers.server import WorkerServer

    w = WorkerServer("decode", f"127.0.0.1:{port}", SPEC)
    w.server.start()  # listening, model not loaded yet: what start() does before _load()
    try:
        with channel(w.address) as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            assert stub.Check(health_pb2.HealthCheckRequest(), timeout=5).status == health_pb2.HealthCheckResponse.NOT_SERVING
            with pytest.raises(errors.Unavailable, match="loading"):
                WorkerClient(w.address).info()
            w._load()
            w.server.ready()
            assert stub.Check(health_pb2.HealthCheckRequest(), timeout=5).status == health_pb2.HealthCheckResponse.SERVING
    finally:
        w.stop()


def test_mixed_generate_cancel_frees_slot(worker_pair: WorkerPair) -> None:
    long = SamplingParams(max_tokens=400, temperature=0, ignore_eos=True)
    first, stream = worker_pair.decode.generate("mixed-cancel", PROMPTS[3], long, timeout=60)
    assert next(stream).token_id >= 0 and worker_pair.decode.info().live_requests == 1
    stream.close()
    info = wait_free(worker_pair)
    assert info.live_requests == 0 and info.kv_free_bytes == info.kv_total_bytes
