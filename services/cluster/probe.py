"""Health probes shared by `tandem up` and the compose healthchecks: `python -m services.cluster.probe grpc|http X`."""

from __future__ import annotations

import sys


def grpc_ok(address: str, timeout_s: float = 1.0) -> bool:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from services.grpcutil import channel

    try:
        with channel(address) as ch:
            resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=timeout_s)
        return resp.status == health_pb2.HealthCheckResponse.SERVING
    except grpc.RpcError:
        return False


def http_ok(url: str, timeout_s: float = 1.0) -> bool:
    import urllib.error  # here, not at the top: the gRPC probe runs often and should start fast
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:  # noqa: S310 - our own loopback URL
            return resp.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("grpc", "http"):
        print("usage: python -m services.cluster.probe grpc HOST:PORT | http URL", file=sys.stderr)
        return 2
    ok = grpc_ok(argv[1], 3.0) if argv[0] == "grpc" else http_ok(argv[1], 3.0)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
