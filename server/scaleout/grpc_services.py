"""The services Serve's gRPC proxy serves, named in ``gRPCOptions.grpc_servicer_functions``.

Serve calls ``add_services(servicer, server)`` on its own gRPC server and replaces every handler's
body with a call to the replica method named like the RPC; what stays is each handler's kind
(unary or streaming) and its request deserializer. Registering the Generation service through
``hedgerow.server.service.wire`` therefore keeps ``hedgerow serve``'s deserializer: a request whose
bytes do not parse reaches the replica as ``Undecodable`` and is refused with INVALID_ARGUMENT
naming the field, not with gRPC's own UNKNOWN. Health is the standard ``grpc.health.v1`` service;
Serve's reflection (on by default) lists both, so ``grpcurl`` works without the proto.
"""

from __future__ import annotations

from grpc_health.v1 import health_pb2_grpc

from hedgerow.server.service.wire import add_generation_service

SERVICER_FUNCTIONS = ["hedgerow.server.scaleout.grpc_services.add_services"]


def add_services(servicer, server) -> None:
    add_generation_service(servicer, server)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
