"""Shared gRPC plumbing against a real server on loopback (health + reflection + error mapping)."""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from services.contracts.errors import InvalidArgument
from services.grpcutil import Server, channel, get_logger, rpc_errors, wait_healthy


class Echo:
    @rpc_errors(get_logger("test"))
    def Check(self, request, context):  # noqa: N802 - gRPC method name
        if request.service == "bad":
            raise InvalidArgument("service: must not be 'bad'")
        if request.service == "boom":
            raise RuntimeError("kaboom")
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)


def test_health_reflection_and_errors() -> None:
    # A second health-shaped service would clash with the built-in one, so call our handler through a
    # generic method handler registered under another service name.
    echo = Echo()
    handler = grpc.method_handlers_generic_handler("test.Echo", {
        "Check": grpc.unary_unary_rpc_method_handler(
            echo.Check, request_deserializer=health_pb2.HealthCheckRequest.FromString,
            response_serializer=health_pb2.HealthCheckResponse.SerializeToString)})
    server = Server("127.0.0.1:0", [lambda s: s.add_generic_rpc_handlers((handler,))], ["test.Echo"]).start()
    try:
        with channel(server.address) as ch:
            hstub = health_pb2_grpc.HealthStub(ch)
            assert hstub.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.NOT_SERVING
            server.ready()
            wait_healthy(server.address, timeout_s=5)
            call = ch.unary_unary("/test.Echo/Check", request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
                                  response_deserializer=health_pb2.HealthCheckResponse.FromString)
            with pytest.raises(grpc.RpcError) as err:
                call(health_pb2.HealthCheckRequest(service="bad"), timeout=5)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "service" in err.value.details()
            with pytest.raises(grpc.RpcError) as err:
                call(health_pb2.HealthCheckRequest(service="boom"), timeout=5)
            assert err.value.code() == grpc.StatusCode.INTERNAL and "kaboom" in err.value.details()
            refl = reflection_pb2_grpc.ServerReflectionStub(ch)
            resp = next(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
            names = {s.name for s in resp.list_services_response.service}
            assert {"test.Echo", "grpc.health.v1.Health"} <= names
    finally:
        server.stop(0)
