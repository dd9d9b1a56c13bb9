"""KV cache <-> KVTransfer chunks: raw little-endian tensor bytes in pieces with a crc32 each; strict validation.

The sender cuts each layer's K and V into pieces of at most `chunk_bytes`; the receiver rebuilds the tensors
in place and rejects anything that does not match its own model (fingerprint, layers, dtype, shape, order,
checksum) with InvalidArgument, so a wrong cache is never installed.
"""

from __future__ import annotations

import sys
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from services.contracts.errors import InvalidArgument
from services.rpc.tandem.v1 import worker_pb2 as pb

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
MIN_CHUNK = 64 * 1024
MAX_CHUNK = 4 * 1024 * 1024  # gRPC messages stay well under the 8 MiB limit of services.grpcutil
DEFAULT_CHUNK = 1024 * 1024
K, V = 0, 1

if sys.byteorder != "little":  # the wire is little-endian raw memory; we never byte-swap silently
    raise ImportError("kvwire needs a little-endian host")


def dtype_name(dtype: torch.dtype) -> str:
    if dtype not in DTYPE_NAMES:
        raise InvalidArgument(f"KV dtype {dtype} cannot be sent (supported: {', '.join(DTYPES)})")
    return DTYPE_NAMES[dtype]


def check_chunk_bytes(chunk_bytes: int) -> int:
    if not MIN_CHUNK <= chunk_bytes <= MAX_CHUNK:
        raise InvalidArgument(f"chunk_bytes must be in [{MIN_CHUNK}, {MAX_CHUNK}] (got {chunk_bytes})",
                              param="chunk_bytes")
    return chunk_bytes


@dataclass(slots=True, frozen=True)
class KVSpec:
    """What one push carries; built by the sender from its engine, checked by the receiver against its own."""

    fingerprint: str
    n_layers: int
    dtype: str
    n_tokens: int
    n_kv_heads: int
    head_dim: int

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.n_tokens, self.n_kv_heads, self.head_dim)

    @property
    def tensor_bytes(self) -> int:
        return self.n_tokens * self.n_kv_heads * self.head_dim * DTYPES[self.dtype].itemsize

    @property
    def nbytes(self) -> int:
        return 2 * self.n_layers * self.tensor_bytes

    def header(self, request_id: str, lease_s: float = 0.0) -> pb.KVChunk:
        return pb.KVChunk(header=pb.KVHeader(
            request_id=request_id, model_fingerprint=self.fingerprint, n_layers=self.n_layers, dtype=self.dtype,
            n_tokens=self.n_tokens, n_kv_heads=self.n_kv_heads, head_dim=self.head_dim, lease_s=lease_s))


def raw_bytes(t: torch.Tensor) -> memoryview:
    """The tensor's element bytes without a copy when it is already contiguous on CPU (bf16 via a uint8 view)."""
    t = t.detach().to("cpu").contiguous()
    return memoryview(t.view(torch.uint8).reshape(-1).numpy())


def tensor_pieces(layer: int, which: int, t: torch.Tensor, chunk_bytes: int = DEFAULT_CHUNK) -> Iterator[pb.KVChunk]:
    """One tensor as pieces of at most chunk_bytes, each with its shape, offset and crc32."""
    buf = raw_bytes(t)
    shape = list(t.shape)
    for off in range(0, len(buf), chunk_bytes):
        data = buf[off:off + chunk_bytes].tobytes()
        yield pb.KVChunk(piece=pb.KVPiece(layer=layer, tensor=which, shape=shape, offset=off, data=data,
                                          crc32=zlib.crc32(data)))


def layer_pieces(layer: int, k: torch.Tensor, v: torch.Tensor, chunk_bytes: int = DEFAULT_CHUNK) -> Iterator[pb.KVChunk]:
    yield from tensor_pieces(layer, K, k, chunk_bytes)
    yield from tensor_pieces(layer, V, v, chunk_bytes)


def encode(spec: KVSpec, request_id: str, layers: list[tuple[torch.Tensor, torch.Tensor]],
           chunk_bytes: int = DEFAULT_CHUNK, lease_s: float = 0.0) -> Iterator[pb.KVChunk]:
    """A whole push: the header, then every layer (used when the cache is complete before sending)."""
    yield spec.header(request_id, lease_s)
    for i, (k, v) in enumerate(layers):
        yield from layer_pieces(i, k, v, chunk_bytes)


class KVAssembler:
    """Rebuilds one push on the receiver. Feed `header()` once, then `piece()`; `layers()` when `complete`."""

    def __init__(self, expect: KVSpec, max_tokens: int) -> None:
        self.expect = expect  # n_tokens is ignored: it comes from the header
        self.max_tokens = max_tokens
        self.spec: KVSpec | None = None
        self.request_id = ""
        self.lease_s = 0.0
        self._tensors: list[torch.Tensor] = []
        self._next = (0, K, 0)  # (layer, tensor, byte offset) the next piece must start at
        self.received = 0

    def header(self, h: pb.KVHeader) -> KVSpec:
        e = self.expect
        checks = [("model_fingerprint", h.model_fingerprint, e.fingerprint), ("n_layers", h.n_layers, e.n_layers),
                  ("dtype", h.dtype, e.dtype), ("n_kv_heads", h.n_kv_heads, e.n_kv_heads),
                  ("head_dim", h.head_dim, e.head_dim)]
        for name, got, want in checks:
            if got != want:
                raise InvalidArgument(f"KV header {name} {got!r} does not match this worker's {want!r}", param=name)
        if not 1 <= h.n_tokens <= self.max_tokens:
            raise InvalidArgument(f"KV header n_tokens {h.n_tokens} outside 1..{self.max_tokens}", param="n_tokens")
        if not h.lease_s >= 0:
            raise InvalidArgument(f"KV header lease_s must be >= 0 (got {h.lease_s})", param="lease_s")
        self.spec = KVSpec(h.model_fingerprint, h.n_layers, h.dtype, h.n_tokens, h.n_kv_heads, h.head_dim)
        self.request_id, self.lease_s = h.request_id, h.lease_s
        return self.spec

    @property
    def complete(self) -> bool:
        return self.spec is not None and self._next[0] == self.spec.n_layers

    def piece(self, p: pb.KVPiece) -> int:
        """Validate and install one piece; returns the layer index when that layer just became complete, else -1."""
        spec = self.spec
        if spec is None:
            raise InvalidArgument("KV push must start with a header", param="header")
        layer, which, off = self._next
        where = f"KV piece (layer {p.layer}, tensor {'KV'[p.tensor] if p.tensor < 2 else p.tensor}, offset {p.offset})"
        if layer >= spec.n_layers:
            raise InvalidArgument(f"{where} after the last layer", param="layer")
        if (p.layer, p.tensor, p.offset) != (layer, which, off):
            raise InvalidArgument(f"{where} out of order: expected layer {layer}, tensor {'KV'[which]}, offset {off}",
                                  param="offset")
        if tuple(p.shape) != spec.shape:
            raise InvalidArgument(f"{where}: shape {list(p.shape)} does not match {list(spec.shape)}", param="shape")
        size, total = len(p.data), spec.tensor_bytes
        if size == 0 or off + size > total or size > MAX_CHUNK:
            raise InvalidArgument(f"{where}: {size} bytes do not fit the tensor's {total} bytes (max piece {MAX_CHUNK})",
                                  param="data")
        if zlib.crc32(p.data) != p.crc32:
            raise InvalidArgument(f"{where}: checksum mismatch (crc32 {zlib.crc32(p.data):#010x}, header says "
                                  f"{p.crc32:#010x})", param="crc32")
        if off == 0:
            self._tensors.append(torch.empty(spec.shape, dtype=DTYPES[spec.dtype]))
        dst = self._tensors[-1].view(torch.uint8).reshape(-1).numpy()
        dst[off:off + size] = np.frombuffer(p.data, dtype=np.uint8)
        self.received += size
        if off + size < total:
            self._next = (layer, which, off + size)
            return -1
        self._next = (layer, V, 0) if which == K else (layer + 1, K, 0)
        return layer if which == V else -1

    def finish(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Every layer's (K, V); InvalidArgument when the push ended early."""
        if self.spec is None:
            raise InvalidArgument("KV push ended before its header", param="header")
        if not self.complete:
            layer, which, off = self._next
            raise InvalidArgument(f"KV push ended early: missing layer {layer} tensor {'KV'[which]} from byte {off} "
                                  f"({self.received} of {self.spec.nbytes} bytes received)", param="data")
        t = self._tensors
        return [(t[2 * i], t[2 * i + 1]) for i in range(self.spec.n_layers)]
