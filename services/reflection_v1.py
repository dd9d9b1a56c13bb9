"""gRPC server reflection v1 (`grpc.reflection.v1.ServerReflection`) beside v1alpha.

grpcio-reflection ships only v1alpha; v1 is the same protocol under another package name (the messages are
wire-identical), so v1 is served by the v1alpha servicer and its descriptor is registered under the v1 name
for clients (grpcurl, Postman) that ask which file defines it.
"""

from __future__ import annotations

from collections.abc import Iterable

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha import reflection, reflection_pb2

PACKAGE = "grpc.reflection.v1"
SERVICE_NAME = f"{PACKAGE}.ServerReflection"
_registered = False


def _register_descriptor() -> None:
    global _registered
    if _registered:
        return
    pool = descriptor_pool.Default()
    try:
        pool.FindServiceByName(SERVICE_NAME)
    except KeyError:
        fdp = descriptor_pb2.FileDescriptorProto()
        reflection_pb2.DESCRIPTOR.CopyToProto(fdp)
        fdp.name, fdp.package = "grpc/reflection/v1/reflection.proto", PACKAGE
        old = f".{reflection_pb2.DESCRIPTOR.package}."
        for msg in fdp.message_type:
            for f in msg.field:
                if f.type_name:  # assigning "" would mark a scalar field as typed
                    f.type_name = f.type_name.replace(old, f".{PACKAGE}.")
        for method in fdp.service[0].method:
            method.input_type = method.input_type.replace(old, f".{PACKAGE}.")
            method.output_type = method.output_type.replace(old, f".{PACKAGE}.")
        pool.Add(fdp)
    _registered = True


def enable(service_names: Iterable[str], server: grpc.Server) -> None:
    """Serve reflection v1 on `server`, listing `service_names` (call beside v1alpha's enable)."""
    _register_descriptor()
    servicer = reflection.ReflectionServicer(list(service_names))
    handler = grpc.method_handlers_generic_handler(SERVICE_NAME, {
        "ServerReflectionInfo": grpc.stream_stream_rpc_method_handler(
            servicer.ServerReflectionInfo,
            request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
            response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString)})
    server.add_generic_rpc_handlers((handler,))
