"""The Python client of a Tandem cluster's gRPC front door (`tandem.v1.Generation`); see docs/client.md."""

from services.client.generation import AsyncClient, AsyncStream, Client, Stream
from services.client.types import TLS, Completion, Delta, Retry, Usage

__all__ = ["AsyncClient", "AsyncStream", "Client", "Completion", "Delta", "Retry", "Stream", "TLS", "Usage"]
