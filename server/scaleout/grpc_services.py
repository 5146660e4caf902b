"""The services Serve's gRPC proxy serves, named in ``gRPCOptions.grpc_servicer_functions``.

Serve calls ``add_services(servicer, server)`` on its own gRPC server and replaces every handler's
body with a call to the replica method named like the RPC; what stays is each handler's kind
(unary or streaming) and its request deserializer. Registering the Generation service through
``hedgerow.server.service.wire`` therefore keeps ``hedgerow serve``'s deserializer: a request whose
bytes do not parse reaches the replica as ``Undecodable`` and is refused with INVALID_ARGUMENT
naming the field, not with gRPC's own UNKNOWN. Health is the standard ``grpc.health.v1`` service;
Serve's reflection (on by default) lists both, so ``grpcurl`` works without the proto.

A replica whose process dies takes its calls with it, and Serve's proxy ends each with INTERNAL and
Ray's own text ("The actor died unexpectedly before finishing this task", with actor ids, pids
and addresses). The handlers Serve makes for these services are wrapped (``replica_stopped``) so
that such a call ends instead with UNAVAILABLE, gRPC's status for "try again", and one sentence,
``REPLICA_STOPPED``: another replica takes the retry. Only that ending is changed; every status a
replica sets itself passes as it is.
"""

from __future__ import annotations

import inspect
import re

import grpc
from grpc_health.v1 import health_pb2_grpc

from hedgerow.server.service.wire import add_generation_service

SERVICER_FUNCTIONS = ["hedgerow.server.scaleout.grpc_services.add_services"]
REPLICA_STOPPED = "the replica serving this request stopped; retry"
# Ray's texts for a call whose actor went away: ActorDiedError, ActorUnavailableError, RayActorError
_ACTOR_GONE = re.compile(r"actor died|actor \S* ?is unavailable|ActorDiedError|ActorUnavailableError|RayActorError",
                         re.IGNORECASE)


def replica_died(code, details: str | None) -> bool:
    """A status Serve's proxy gives a call whose replica process died."""
    return code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN) and bool(_ACTOR_GONE.search(details or ""))


def _clean(context) -> None:
    try:
        code, details = context.code(), context.details()
    except Exception:  # a context without the getters (grpc < 1.38): leave Serve's status
        return
    if replica_died(code, details.decode() if isinstance(details, bytes) else details):
        context.set_code(grpc.StatusCode.UNAVAILABLE)
        context.set_details(REPLICA_STOPPED)


def replica_stopped(factory):
    """Serve's ``service_handler_factory`` with the status of a dead replica's calls cleaned: the
    handler it makes runs as it is, then a status naming Ray's dead actor becomes
    UNAVAILABLE ``REPLICA_STOPPED``."""

    def make(*args, **kwargs):
        handler = factory(*args, **kwargs)
        if inspect.isasyncgenfunction(handler):
            async def streaming(request, context):
                async for message in handler(request, context):
                    yield message
                _clean(context)

            return streaming

        if inspect.iscoroutinefunction(handler):
            async def unary(request, context):
                response = await handler(request, context)
                _clean(context)
                return response

            return unary
        return handler

    return make


def add_services(servicer, server) -> None:
    factory = getattr(server, "service_handler_factory", None)
    if factory is not None:  # Serve's gRPC server (Serve 2.x): clean what these services' handlers end with
        server.service_handler_factory = replica_stopped(factory)
    try:
        add_generation_service(servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    finally:
        if factory is not None:  # other applications' services keep Serve's own handlers
            server.service_handler_factory = factory
