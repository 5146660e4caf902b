"""Who may call the server: an API key in the call's metadata, and TLS on the port.

With a key (``hedgerow serve --api-key-file``, ``HEDGEROW_API_KEY``), every call but the health
service's must carry ``authorization: Bearer KEY``; others end with UNAUTHENTICATED, their request
never parsed. Health stays open so that load balancers and supervisors can probe without the
secret, and says nothing a caller could use. The key is compared in constant time, by the rule the
proxy's key follows too (``hedgerow.server.proxy.keys``, shared by the two command lines).
"""

from __future__ import annotations

import grpc

from hedgerow.server.proxy.keys import bearer_matches

OPEN_PREFIXES = ("/grpc.health.v1.Health/",)  # methods that need no key


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """Refuse calls without the key; ``on_refused`` is called once per refusal (the metrics)."""

    def __init__(self, key: str, on_refused=lambda: None):
        self.key = key
        self.on_refused = on_refused

        async def refuse(request, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                "missing or wrong API key: send the metadata 'authorization: Bearer <key>'")

        # one unary handler whatever the method: the call ends with the status, its request unparsed
        self._refusal = grpc.unary_unary_rpc_method_handler(refuse)

    async def intercept_service(self, continuation, details):
        if details.method.startswith(OPEN_PREFIXES):
            return await continuation(details)
        header = next((v for k, v in details.invocation_metadata or () if k == "authorization"), None)
        if isinstance(header, bytes):
            header = header.decode("latin-1")
        if bearer_matches(header, self.key):
            return await continuation(details)
        self.on_refused()
        return self._refusal


def server_credentials(cert_pem: bytes, key_pem: bytes) -> grpc.ServerCredentials:
    """TLS for the gRPC port from a PEM certificate chain and its private key."""
    return grpc.ssl_server_credentials([(key_pem, cert_pem)])
