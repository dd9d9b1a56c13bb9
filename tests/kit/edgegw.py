"""A real gateway (uvicorn HTTP + gRPC servers, real validation) over fake mixed workers, in this process.

Fast enough for fuzzing the front doors: no model runs; each fake worker echoes a few tokens.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.workers.client import PrefillResult, TokenEvent, WorkerInfo

VOCAB, CONTEXT = 384, 256


class FakeMixedWorker:
    """Answers Info and Generate like a mixed worker: `max_tokens` tokens (ids 10, 11, ...), then "length"."""

    def __init__(self, address: str, delay_s: float = 0.0) -> None:
        self.address, self.delay_s = address, delay_s

    def info(self, timeout: float = 2.0) -> WorkerInfo:
        return WorkerInfo(role="mixed", model="tiny", fingerprint="fake", address=self.address,
                          pending_prompt_tokens=0, live_requests=0, waiting_requests=0, kv_free_bytes=1 << 20,
                          kv_total_bytes=1 << 20, max_seq_len=CONTEXT, vocab_size=VOCAB, kv_dtype="float32")

    def generate(self, request_id: str | None, prompt_ids: list[int], params: Any,
                 timeout: float, on_call: Any = None) -> tuple[PrefillResult, Iterator[TokenEvent]]:
        n = params.max_tokens
        first = PrefillResult(request_id or "", 40, "", len(prompt_ids), "length" if n == 1 else None)

        def events() -> Iterator[TokenEvent]:
            for i in range(1, n):
                if self.delay_s:
                    time.sleep(self.delay_s)
                yield TokenEvent(40 + i, "length" if i == n - 1 else None)
        return first, events()

    def close(self) -> None:
        pass


@dataclass
class EdgeGateway:
    http: str
    grpc: str
    gateway: Any


def tiny_tokenizer(folder: Path) -> Any:
    from kit.checkpoints import write_tokenizer
    from services.engine.tokenizer import Tokenizer

    write_tokenizer(folder, VOCAB)
    return Tokenizer.from_dir(folder)


@contextlib.contextmanager
def edge_gateway(folder: Path, keys: Any = None, delay_s: float = 0.0, max_body: int | None = None
                 ) -> Iterator[EdgeGateway]:
    """HTTP and gRPC front doors of one Gateway on free loopback ports, as `tandem serve gateway` wires them."""
    import uvicorn

    from kit.net import free_port
    from services.gateway.core import Gateway
    from services.gateway.edge import ApiKeyInterceptor, ApiKeys
    from services.gateway.grpc_front import SERVICE_NAME, add_to_server
    from services.gateway.http import create_app
    from services.gateway.schema import MAX_BODY_BYTES
    from services.grpcutil import Server
    from services.registry import StaticRegistry

    keys = keys or ApiKeys(())
    gw = Gateway(tiny_tokenizer(folder), StaticRegistry.from_pairs(["mixed=127.0.0.1:1"]), "tiny",
                 client_factory=lambda addr: FakeMixedWorker(addr, delay_s))
    rpc = Server("127.0.0.1:0", [add_to_server(gw)], [SERVICE_NAME], interceptors=[ApiKeyInterceptor(keys)],
                 max_receive_bytes=max_body or MAX_BODY_BYTES).start()
    rpc.ready()
    port = free_port()
    app = create_app(gw, keys=keys, max_body=max_body or MAX_BODY_BYTES)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    try:
        yield EdgeGateway(f"http://127.0.0.1:{port}", rpc.address, gw)
    finally:
        server.should_exit = True
        thread.join(10)
        rpc.stop(0.5)
        gw.close()
