"""`tandem bench kv`: KV push throughput over gRPC vs raw TCP (same bytes, one run), and split vs mixed TTFT.

Both transports carry the cache from this process to a separate receiver process on loopback. gRPC goes
through the real path (kvwire pieces with crc32 -> a decode worker that validates and leases them); raw
TCP is the floor: a length prefix, the same tensor bytes, a receiver that reads them into a buffer.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import socket
import struct
import subprocess
import sys
import time
import zlib
from typing import Any

import torch

from services.contracts.errors import InvalidArgument
from services.grpcutil import channel, wait_healthy
from services.kv.proto import encode_wire
from services.kv.sender import PUSH
from services.kv.wire import DEFAULT_CHUNK, KVSpec, dtype_name, raw_bytes
from services.rpc.tandem.v1 import worker_pb2 as pb
from services.rpc.tandem.v1 import worker_pb2_grpc as rpc
from services.workers.modelspec import load_model, random_spec

# Small weights, big KV: 8 layers x 8 KV heads x 128 dims -> 4 KiB per token per tensor (f32).
KV_MODEL = dict(vocab_size=256, dim=64, n_layers=8, n_heads=8, n_kv_heads=8, head_dim=128, hidden_dim=128,
                max_seq_len=16384)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _raw_sink(port: int, ready: Any) -> None:
    """Receive length-prefixed transfers into one reusable buffer; answer each with 8 bytes (the count)."""
    with socket.create_server(("127.0.0.1", port)) as srv:
        ready.set()
        conn, _ = srv.accept()
        buf = bytearray(64 << 20)
        view = memoryview(buf)
        with conn:
            while True:
                head = conn.recv(8, socket.MSG_WAITALL)
                if len(head) < 8:
                    return
                (left,) = struct.unpack("<Q", head)
                total = left
                while left:
                    n = conn.recv_into(view[: min(left, len(buf))])
                    if n == 0:
                        return
                    left -= n
                conn.sendall(struct.pack("<Q", total))


def worker_device(value: str | None, param: str) -> tuple[list[str], dict[str, str]]:
    """'cpu', 'cuda' or 'cuda:N' -> (the worker's --device arguments, the environment pinning it to GPU N alone):
    `tandem up`'s placement (services/cluster/launcher.py), with this bench's option named in the error."""
    from services.cluster.launcher import placement
    from services.contracts.layout import parse_device

    if value is None:
        return [], {}
    try:
        parse_device(value)
    except ValueError:
        raise InvalidArgument(f"{param} must be 'cpu' or 'cuda:N' with N a GPU index, e.g. cuda:0, or 'cuda' "
                              f"(got {value!r})", param=param.lstrip("-").replace("-", "_")) from None
    return placement(value, param.lstrip("-").replace("-", "_"))


def model_for_ttft(model: str | None, dtype: str | None, lengths: list[int]) -> str | None:
    """The worker spec for --ttft: a SHAPES name (random weights of that shape, context fitted to the longest
    prompt) becomes a random spec; any other spec passes through. `dtype` applies to SHAPES names only."""
    from dataclasses import asdict

    from services.engine.shapes import SHAPES
    from services.workers.modelspec import DTYPES

    if dtype is not None and dtype not in DTYPES:
        raise InvalidArgument(f"--ttft-dtype must be one of {', '.join(DTYPES)} (got {dtype!r})", param="ttft_dtype")
    if model not in SHAPES:
        if dtype is not None:
            raise InvalidArgument(f"--ttft-dtype applies to a shape name ({', '.join(SHAPES)}), not to {model!r}; "
                                  "put \"dtype\" in a random:<json> spec instead", param="ttft_dtype")
        return model
    cfg = asdict(SHAPES[model])
    cfg["max_seq_len"] = max(cfg["max_seq_len"], max(lengths) + 64)
    return random_spec(**cfg, **({"dtype": dtype} if dtype else {}))


def _spawn_worker(role: str, spec: str | None, extra: list[str] | None = None,
                  env: dict[str, str] | None = None, log: Any = None) -> tuple[subprocess.Popen, str]:
    addr = f"127.0.0.1:{_free_port()}"
    model = ["--model", spec] if spec else []  # None: the worker loads the embedded default model
    proc = subprocess.Popen([sys.executable, "-m", "services.workers.server", role, "--address", addr, *model,
                             *(extra or [])], stderr=log or subprocess.DEVNULL, env={**os.environ, **(env or {})})
    return proc, addr


def _wait_started(started: list[tuple[subprocess.Popen, str]], timeout_s: float) -> None:
    """Every worker healthy; a worker that exits first fails at once (not after the whole timeout)."""
    deadline = time.monotonic() + timeout_s
    for proc, addr in started:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"worker at {addr} exited with code {proc.returncode} before it was healthy "
                                   "(--worker-log FILE keeps its stderr)")
            try:
                wait_healthy(addr, 2)
                break
            except TimeoutError:
                if time.monotonic() > deadline:
                    raise


def _stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        p.terminate()
    for p in procs:
        try:
            p.wait(15)
        except subprocess.TimeoutExpired:
            p.kill()


def kv_throughput(tokens: int = 4096, repeats: int = 4, chunk_bytes: int = DEFAULT_CHUNK) -> dict[str, Any]:
    """Best-of-`repeats` throughput of one request's whole KV (Gbit/s) over gRPC and raw TCP, side by side."""
    spec_str = random_spec(**KV_MODEL)
    engine = load_model(spec_str)
    cfg = engine.cfg
    spec = KVSpec(engine.fingerprint, cfg.n_layers, dtype_name(engine.dtype), tokens, cfg.n_kv_heads, cfg.head_dim)
    g = torch.Generator().manual_seed(0)
    layers = [(torch.randn(spec.shape, generator=g), torch.randn(spec.shape, generator=g)) for _ in range(cfg.n_layers)]
    nbytes = spec.nbytes
    budget_mb = str(4 * nbytes / 2**20 + 64)
    proc, addr = _spawn_worker("decode", spec_str, ["--kv-budget-mb", budget_mb])
    ctx = mp.get_context("spawn")
    ready = ctx.Event()
    port = _free_port()
    sink = ctx.Process(target=_raw_sink, args=(port, ready), daemon=True)
    sink.start()
    grpc_s, raw_s = [], []
    try:
        wait_healthy(addr, 120)
        ready.wait(30)
        with channel(addr) as ch, socket.create_connection(("127.0.0.1", port)) as sock:
            stub = rpc.KVTransferStub(ch)
            push = ch.stream_unary(PUSH, request_serializer=None, response_deserializer=pb.KVReceipt.FromString)

            for i in range(repeats + 1):  # the first round warms both paths up and is not counted
                t0 = time.perf_counter()
                receipt = push(encode_wire(spec, f"bench-{i}", layers, chunk_bytes), timeout=120)  # the sender's path
                dt = time.perf_counter() - t0
                assert receipt.bytes == nbytes
                stub.Release(pb.KVReleaseRequest(handle=receipt.handle), timeout=10)
                t0 = time.perf_counter()
                sock.sendall(struct.pack("<Q", nbytes))
                for k, v in layers:
                    sock.sendall(raw_bytes(k))
                    sock.sendall(raw_bytes(v))
                (got,) = struct.unpack("<Q", sock.recv(8, socket.MSG_WAITALL))
                dr = time.perf_counter() - t0
                assert got == nbytes
                if i:
                    grpc_s.append(dt)
                    raw_s.append(dr)
    finally:
        _stop([proc])
        sink.terminate()
    t0 = time.perf_counter()
    for k, v in layers:
        zlib.crc32(raw_bytes(k))
        zlib.crc32(raw_bytes(v))
    crc_s = time.perf_counter() - t0
    gbps = lambda s: nbytes * 8 / min(s) / 1e9  # noqa: E731
    return {"grpc_gbps": gbps(grpc_s), "raw_tcp_gbps": gbps(raw_s), "ratio": gbps(grpc_s) / gbps(raw_s),
            "crc32_gbps": nbytes * 8 / crc_s / 1e9, "bytes_per_transfer": nbytes, "tokens": tokens,
            "layers": cfg.n_layers, "chunk_bytes": chunk_bytes, "repeats": repeats,
            "grpc_s": grpc_s, "raw_tcp_s": raw_s}


def _split_run(pc: Any, sc: Any, dc: Any, d_addr: str, prompt: list[int], params: Any) -> dict[str, Any]:
    """One prompt through one path: overlapped push (then decoded), and pushed after the pass (released)."""
    t0 = time.perf_counter()
    r = pc.prefill(None, prompt, params, d_addr, timeout=600)
    split = time.perf_counter() - t0
    tokens = [r.first_token] + [e.token_id for e in dc.decode(None, r.handle, r.first_token, params, timeout=600)]
    t0 = time.perf_counter()
    rs = sc.prefill(None, prompt, params, d_addr, timeout=600)  # same, KV pushed after the forward pass
    serial = time.perf_counter() - t0
    dc.release(rs.handle)
    return {"split_ttft_s": split, "split_serial_ttft_s": serial, "prefill_s": r.timings.prefill_s,
            "queue_s": r.timings.queue_s, "kv_exposed_s": r.timings.kv_transfer_s,
            "kv_serial_s": rs.timings.kv_transfer_s, "kv_bytes": r.kv_bytes, "kv_path_used": r.kv_path,
            "kv_path_serial_used": rs.kv_path, "first_token": r.first_token, "serial_first_token": rs.first_token,
            "tokens": tokens}


def _mixed_run(mc: Any, prompt: list[int], params: Any) -> dict[str, Any]:
    t0 = time.perf_counter()
    first, rest = mc.generate(None, prompt, params, timeout=600)
    mixed = time.perf_counter() - t0
    tokens = [first.first_token] + [e.token_id for e in rest]
    return {"mixed_ttft_s": mixed, "mixed_prefill_s": first.timings.prefill_s, "tokens": tokens}


def check_kv_paths(value: str, devices: dict[str, str | None]) -> list[str]:
    """--kv-path: a comma list of grpc / ipc / auto; ipc needs both the prefill and decode workers on one GPU
    (the bench shows each worker only its own GPU, so IPC across two would always fall back)."""
    paths = [p.strip() for p in value.split(",") if p.strip()]
    bad = [p for p in paths if p not in ("grpc", "ipc", "auto")]
    if not paths or bad or len(set(paths)) != len(paths):
        raise InvalidArgument(f"--kv-path must be distinct names among grpc, ipc, auto, comma-separated (got {value!r})",
                              param="kv_path")
    if "ipc" in paths:
        pre, dec = ((devices.get(r) or "").strip().lower() for r in ("prefill", "decode"))
        if not pre.startswith("cuda:") or pre != dec:
            raise InvalidArgument("--kv-path ipc needs --prefill-device and --decode-device on the same GPU, e.g. "
                                  f"cuda:0 for both (got {devices.get('prefill')!r} and {devices.get('decode')!r})",
                                  param="kv_path")
    return paths


def ttft(model: str | None, lengths: list[int], max_tokens: int = 2, progress: Any = None,
         repeats: int = 1, devices: dict[str, str | None] | None = None, log: Any = None,
         kv_paths: list[str] | None = None) -> list[dict[str, Any]]:
    """TTFT per prompt length and KV path: prefill -> layer-wise KV push -> decode worker, the same with the push
    after the forward pass (no overlap), and the mixed worker (no push). One process per worker (per path: a
    prefill worker and a no-overlap prefill worker started with `--kv-path PATH`; one decode worker and one
    mixed worker), requests one at a time; each column is the best of `repeats` interleaved runs. Returns one
    row per (length, path), each with the length's mixed-worker columns. `devices` maps "prefill" (every
    prefill worker), "decode" and "mixed" to 'cpu' / 'cuda:N' (None: the worker's default); `log`, a file the
    workers' stderr goes to. `kv_path_used` in a row is the path the KV actually took (a refused IPC push
    goes over gRPC)."""
    from services.engine.sampling import SamplingParams
    from services.workers.client import WorkerClient

    paths = kv_paths or ["grpc"]
    # One request at a time here; a small max_batch keeps the decode scheduler's dense KV (max_batch slots x
    # the longest context) within memory for 4096-token prompts.
    args = ["--max-batch-tokens", str(max(lengths)), "--kv-timeout-s", "300", "--kv-stall-s", "120",
            "--max-batch", "2"]
    placed = {role: worker_device((devices or {}).get(role), f"--{role}-device") for role in ("prefill", "decode", "mixed")}
    plan = [("decode", []), ("mixed", [])]
    for path in paths:
        plan += [("prefill", ["--kv-path", path]), ("prefill", ["--kv-path", path, "--no-kv-overlap"])]
    started = [_spawn_worker(r, model, args + x + placed[r][0], placed[r][1], log) for r, x in plan]
    procs = [p for p, _ in started]
    d_addr = started[0][1]
    rows = []
    clients: list[Any] = []
    try:
        _wait_started(started, 600)
        clients = [WorkerClient(addr) for _, addr in started]
        dc, mc = clients[0], clients[1]
        pairs = {path: (clients[2 + 2 * i], clients[3 + 2 * i]) for i, path in enumerate(paths)}
        vocab = dc.info().vocab_size
        params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
        for n in [lengths[0], *lengths]:  # the first (repeated) length warms every process up
            prompt = [(i * 7919) % (vocab - 10) + 5 for i in range(n)]
            runs: dict[str, list[dict]] = {path: [] for path in paths}
            mixed = []
            for _ in range(repeats):
                for path in paths:
                    runs[path].append(_split_run(*pairs[path], dc, d_addr, prompt, params))
                mixed.append(_mixed_run(mc, prompt, params))
            m_best = {k: min(r[k] for r in mixed) for k in ("mixed_ttft_s", "mixed_prefill_s")}
            length_rows = []
            for path in paths:
                rs = runs[path]
                best = {k: min(r[k] for r in rs) for k in ("split_ttft_s", "split_serial_ttft_s", "prefill_s",
                                                          "queue_s", "kv_exposed_s", "kv_serial_s")}
                best.update(m_best)
                used = sorted({r["kv_path_used"] for r in rs}), sorted({r["kv_path_serial_used"] for r in rs})
                firsts = {r["first_token"] for r in rs} | {r["serial_first_token"] for r in rs}
                best.update(prompt_tokens=n, kv_path=path, kv_path_used=",".join(used[0]),
                            kv_path_serial_used=",".join(used[1]), ratio=best["split_ttft_s"] / best["mixed_ttft_s"],
                            kv_bytes=rs[0]["kv_bytes"], repeats=repeats,
                            first_token_equal=firsts == {m["tokens"][0] for m in mixed},
                            tokens_equal_mixed=all(r["tokens"] == m["tokens"] for r in rs for m in mixed))
                length_rows.append(best)
            rows.append(length_rows)
            if progress:
                progress(length_rows if len(rows) > 1 else None)  # None: the warm-up length, not reported
    finally:
        for c in clients:
            c.close()
        _stop(procs)
    return [r for length_rows in rows[1:] for r in length_rows]
