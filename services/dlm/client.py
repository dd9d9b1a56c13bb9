"""DLMClient: one gRPC channel to a dlm worker's `tandem.v1.Diffusion`; statuses come back as services.contracts.errors.

Torch-free, so the gateway can import it. The service name, model name, option fields and `DLMChunk` are the
worker's contract, defined once in services.dlm.protocol.
"""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Iterator

import grpc

from services.contracts import errors
from services.dlm.protocol import MODEL_NAME, OPTION_FIELDS, SERVICE, DLMChunk
from services.grpcutil import REQUEST_ID_KEY, channel, error_from_rpc

__all__ = ["MODEL_NAME", "OPTION_FIELDS", "SERVICE", "DLMChunk", "DLMClient"]


class DLMClient:
    """Calls one dlm worker. Every call carries a deadline and the request id as `x-request-id` metadata."""

    def __init__(self, address: str) -> None:
        from services.rpc.tandem.v1 import dlm_pb2, dlm_pb2_grpc

        self.address = address
        self._pb = dlm_pb2
        self._channel = channel(address)
        self._stub = dlm_pb2_grpc.DiffusionStub(self._channel)

    def generate(self, prompt: str, timeout: float, request_id: str | None = None,
                 **options: object) -> Iterator[DLMChunk]:
        """Committed text as the worker streams it. Validation errors raise before the first chunk is returned
        (the first message is fetched eagerly); closing the iterator cancels the call."""
        unknown = sorted(set(options) - set(OPTION_FIELDS))
        if unknown:
            raise errors.InvalidArgument(f"{unknown[0]}: not an option of the dlm worker (known: "
                                         f"{', '.join(OPTION_FIELDS)})", param=unknown[0])
        rid = request_id or uuid.uuid4().hex[:16]
        req = self._pb.DiffusionGenerateRequest(prompt=prompt,
                                                **{k: v for k, v in options.items() if v is not None})
        call = self._stub.DiffusionGenerate(req, timeout=timeout, metadata=((REQUEST_ID_KEY, rid),))
        try:
            first = next(call)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc, f"worker {self.address}") from None
        except StopIteration:
            raise errors.Unavailable(f"dlm worker {self.address} ended the stream without a message") from None
        return self._stream(call, first)

    def _stream(self, call: grpc.Call, first: object) -> Iterator[DLMChunk]:
        try:
            for m in itertools.chain((first,), call):
                c = _chunk(m)
                if c.done:
                    for _ in call:  # let the worker end the call itself (a cancel now would skip its bookkeeping)
                        pass
                yield c
        except grpc.RpcError as exc:
            raise error_from_rpc(exc, f"worker {self.address}") from None
        finally:
            call.cancel()  # no-op when finished; tells the worker to stop when the caller leaves early

    def healthy(self, timeout: float = 1.0) -> bool:
        """gRPC health of the Diffusion service (SERVING once the model is loaded)."""
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        try:
            resp = health_pb2_grpc.HealthStub(self._channel).Check(
                health_pb2.HealthCheckRequest(service=SERVICE), timeout=timeout)
        except grpc.RpcError:
            return False
        return resp.status == health_pb2.HealthCheckResponse.SERVING

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> DLMClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _chunk(m: object) -> DLMChunk:
    return DLMChunk(m.text, m.committed_tokens, m.steps, m.forward_passes, m.dlm_tokens, m.done)  # type: ignore[attr-defined]
