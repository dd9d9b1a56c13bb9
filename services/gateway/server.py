"""Run the gateway process: HTTP (uvicorn) and gRPC front doors over one Gateway, until SIGINT/SIGTERM."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Sequence

from services.contracts.layout import Layout
from services.gateway.core import Gateway
from services.grpcutil import Server, get_logger, log
from services.registry.connect import gateway_registry
from services.workers.client import WorkerInfo

logger = get_logger("tandem.gateway")


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def split_hostport(addr: str, field: str) -> tuple[str, int]:
    from services.contracts.errors import InvalidArgument

    host, sep, port = addr.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise InvalidArgument(f"{field}: expected HOST:PORT, got {addr!r}", param=field)
    return host, int(port)


def _poll_info() -> Callable[[str, float], WorkerInfo]:
    """How the embedded registry polls a worker's load: one WorkerClient per address, kept."""
    from services.workers.client import WorkerClient

    clients: dict[str, WorkerClient] = {}

    def info(address: str, timeout: float) -> WorkerInfo:
        if address not in clients:
            clients[address] = WorkerClient(address)
        return clients[address].info(timeout=timeout)

    return info


def build_gateway(layout: Layout, workers: Sequence[str] = (), tokenizer: object = None,
                  max_inflight: int | None = None) -> Gateway:
    """A Gateway for a layout; `workers` (ROLE=HOST:PORT) overrides the addresses the layout implies.

    The admission bound is `max_inflight`, else the layout's `gateway.max_inflight`, else what its pools hold.
    """
    from services.gateway.tokenizer import load_tokenizer

    layout.check_servable()
    registry = gateway_registry(layout, _poll_info(), workers)
    tok = tokenizer if tokenizer is not None else load_tokenizer(layout.model.path)
    limit = max_inflight or layout.gateway.max_inflight or layout.capacity()
    return Gateway(tok, registry, layout.model.name, routing=layout.router.policy, max_inflight=limit,
                   stall_s=layout.gateway.stall_s)


def draining_server(config: object, gw: Gateway, rpc: Server, grace_s: float) -> object:
    """uvicorn's server, except that the first SIGINT/SIGTERM drains (new requests 503, in-flight ones finish
    within the grace) before it stops; a second signal stops at once."""
    import uvicorn

    class Draining(uvicorn.Server):
        _drain: threading.Thread | None = None

        def handle_exit(self, sig: int, frame: object) -> None:
            if self._drain is not None:  # second signal: stop now
                self.should_exit = self.force_exit = True
                return
            self._drain = threading.Thread(target=self._drain_then_exit, name="gateway-drain", daemon=True)
            self._drain.start()

        def _drain_then_exit(self) -> None:
            rpc.health.enter_graceful_shutdown()  # gRPC health NOT_SERVING; HTTP /health answers 503
            done = gw.drain(grace_s)
            log(logger, "drained" if done else "drain grace over; stopping with requests in flight",
                inflight=gw.admission.inflight)
            self.should_exit = True

    return Draining(config)


def serve(layout: Layout | None = None, http: str | None = None, grpc_address: str | None = None,
          workers: Sequence[str] = (), max_inflight: int | None = None) -> None:
    """Blocks until SIGINT/SIGTERM, then drains. Addresses default to the layout's `gateway` section."""
    import uvicorn

    from services.gateway.edge import ApiKeyInterceptor, ApiKeys, is_loopback
    from services.gateway.grpc_front import SERVICE_NAME, add_to_server
    from services.gateway.http import create_app
    from services.gateway.schema import MAX_BODY_BYTES

    layout = layout or Layout()
    http = http or layout.gateway.http
    grpc_address = grpc_address or layout.gateway.grpc
    host, port = split_hostport(http, "gateway.http")
    grpc_host, _ = split_hostport(grpc_address, "gateway.grpc")
    keys = ApiKeys.load()
    if not keys and not (is_loopback(host) and is_loopback(grpc_host)):
        log(logger, "no API keys configured and the gateway listens beyond loopback: anyone who can reach it may "
            "use it (set TANDEM_API_KEYS or TANDEM_API_KEYS_FILE)", 30, http=http, grpc=grpc_address)
    gw = build_gateway(layout, workers, max_inflight=max_inflight)
    # Request messages get the HTTP body limit (RESOURCE_EXHAUSTED above it); the gateway receives nothing larger.
    rpc = Server(grpc_address, [add_to_server(gw)], [SERVICE_NAME], max_workers=gw.admission.limit + 16,
                 interceptors=[ApiKeyInterceptor(keys)], max_receive_bytes=MAX_BODY_BYTES, client_certs=False).start()
    rpc.ready()
    log(logger, "gateway up", http=http, grpc=rpc.address, workers=[e.address for e in gw.registry.all()],
        auth="api-key" if keys else "open", max_inflight=gw.admission.limit, stall_s=gw.stall_s,
        drain_s=layout.gateway.drain_s)
    # uvicorn re-raises the signal that stopped it once it is done; make SIGTERM end in our cleanup too
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)
    try:
        config = uvicorn.Config(create_app(gw, keys=keys), host=host, port=port, log_level="warning",
                                timeout_graceful_shutdown=3, limit_concurrency=None)
        draining_server(config, gw, rpc, layout.gateway.drain_s).run()
    except KeyboardInterrupt:
        pass
    finally:
        rpc.stop(1.0)
        gw.close()
        log(logger, "gateway stopped")
