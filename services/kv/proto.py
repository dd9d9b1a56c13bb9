"""KVChunk in protobuf wire form by hand, for the hot path of a push: one copy of the tensor bytes per piece.

`piece_bytes` is byte-identical to `KVChunk.SerializeToString()` (tested); `parse_chunk` reads a piece without
copying its data (a memoryview into the received message) and falls back to protobuf for anything else.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from google.protobuf.message import DecodeError

from services.kv.wire import DEFAULT_CHUNK, K, KVSpec, V, raw_bytes
from services.rpc.tandem.v1 import worker_pb2 as pb


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _field(number: int, wire_type: int) -> bytes:
    return _varint(number << 3 | wire_type)


def tensor_piece_bytes(layer: int, which: int, t: torch.Tensor, chunk_bytes: int = DEFAULT_CHUNK) -> Iterator[bytes]:
    """The same pieces as `tensor_pieces`, already in protobuf wire form (`KVChunk.SerializeToString()`).

    The tensor bytes are copied once, into the message, instead of three times (bytes slice, protobuf
    field, serialized message).
    """
    buf = raw_bytes(t)
    shape = b"".join(_varint(d) for d in t.shape)
    fixed = (_field(1, 0) + _varint(layer) if layer else b"") + (_field(2, 0) + _varint(which) if which else b"") \
        + (_field(3, 2) + _varint(len(shape)) + shape if shape else b"")
    for off in range(0, len(buf), chunk_bytes):
        data = buf[off:off + chunk_bytes]
        crc = zlib.crc32(data)
        head = fixed + (_field(4, 0) + _varint(off) if off else b"") + _field(5, 2) + _varint(len(data))
        tail = _field(6, 0) + _varint(crc) if crc else b""
        body = len(head) + len(data) + len(tail)
        yield b"".join((_field(2, 2), _varint(body), head, data, tail))


def layer_piece_bytes(layer: int, k: torch.Tensor, v: torch.Tensor, chunk_bytes: int = DEFAULT_CHUNK) -> Iterator[bytes]:
    yield from tensor_piece_bytes(layer, K, k, chunk_bytes)
    yield from tensor_piece_bytes(layer, V, v, chunk_bytes)


def encode_wire(spec: KVSpec, request_id: str, layers: list[tuple[torch.Tensor, torch.Tensor]],
                chunk_bytes: int = DEFAULT_CHUNK, lease_s: float = 0.0) -> Iterator[bytes]:
    """`encode` in wire form, for a stub whose request serializer passes bytes through."""
    yield spec.header(request_id, lease_s).SerializeToString()
    for i, (k, v) in enumerate(layers):
        yield from layer_piece_bytes(i, k, v, chunk_bytes)


@dataclass(slots=True)
class Piece:
    """A parsed KVPiece (same attribute names); `data` is a view into the received message."""

    layer: int = 0
    tensor: int = 0
    shape: tuple[int, ...] = ()
    offset: int = 0
    data: memoryview | bytes = b""
    crc32: int = 0


def _read_varint(mv: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        b = mv[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def _parse_piece(mv: memoryview) -> Piece:
    p = Piece()
    pos = 0
    while pos < len(mv):
        key, pos = _read_varint(mv, pos)
        number, wire = key >> 3, key & 7
        if wire == 0 and number in (1, 2, 4, 6):
            value, pos = _read_varint(mv, pos)
            setattr(p, {1: "layer", 2: "tensor", 4: "offset", 6: "crc32"}[number], value)
        elif wire == 2 and number in (3, 5):
            n, pos = _read_varint(mv, pos)
            if pos + n > len(mv):
                raise ValueError("truncated field")
            sub, pos = mv[pos:pos + n], pos + n
            if number == 5:
                p.data = sub
            else:
                dims, i = [], 0
                while i < len(sub):
                    d, i = _read_varint(sub, i)
                    dims.append(d)
                p.shape = tuple(dims)
        else:
            raise ValueError(f"unexpected field {number}/{wire}")  # let protobuf handle the general case
    return p


def parse_chunk(raw: bytes) -> pb.KVHeader | Piece | str:
    """A push message as a header, a piece, or an error message (a gRPC deserializer must not raise)."""
    try:
        mv = memoryview(raw)
        key, pos = _read_varint(mv, 0)
        if key == (2 << 3 | 2):
            n, pos = _read_varint(mv, pos)
            if pos + n == len(mv):
                return _parse_piece(mv[pos:])
    except (IndexError, ValueError):
        pass
    try:
        chunk = pb.KVChunk.FromString(raw)
    except DecodeError as exc:
        return f"undecodable KV chunk: {exc}"
    kind = chunk.WhichOneof("kind")
    if kind == "header":
        return chunk.header
    if kind == "piece":
        q = chunk.piece
        return Piece(q.layer, q.tensor, tuple(q.shape), q.offset, q.data, q.crc32)
    return "empty KV chunk (neither header nor piece)"
