"""One Serve replica: one Hedgerow engine, and both front doors to it.

``HedgerowReplica`` is built from the ``hedgerow serve`` arguments by the same code as the single
process (``build_engine``, ``served_names``): the engine thread, continuous batching, the cost policy,
the ``GenerationService`` and a Prometheus ``Metrics`` of its own. What reaches it:

- **gRPC**, from Serve's gRPC proxy, which calls the method named like the RPC with the request
  message and a ``grpc_context``: ``Generate``, ``GenerateStream``, ``ModelInfo``, and the health
  service's ``Check`` and ``Watch``. The API key is checked here, health exempt, as
  ``hedgerow serve``'s interceptor does; a status the service ends a call with is set on Serve's
  context before the call fails, which is how Serve 2.60 carries a replica's status to the client.
- **HTTP**, from Serve's HTTP proxy, into the OpenAI app of ``hedgerow proxy`` (the same routes,
  key check, body limits and error JSON), built in the replica with a ``LocalBackend`` that calls
  the service in process.

There is no router deployment in front: Serve's proxies already pick a replica per request (the
one with fewer requests in flight of two chosen at random), so a second hop would only add a
serialisation per message. Each response says which replica served it: the ``x-hedgerow-replica``
HTTP header, the ``hedgerow-replica`` gRPC trailing metadata.

Serve calls ``check_health`` every few seconds; once the engine thread has died it raises, and Serve
replaces the replica (the single process exits for a supervisor instead).
"""

from __future__ import annotations

import asyncio
import logging
import socket
from concurrent.futures import ThreadPoolExecutor

import grpc
from grpc_health.v1 import health_pb2

from hedgerow.server.proxy.keys import bearer_matches
from hedgerow.server.rpc import generation_pb2 as pb
from hedgerow.server.scaleout.calls import Aborted, CallContext
from hedgerow.server.scaleout.directory import register_replica, unregister_replica

log = logging.getLogger("hedgerow.scaleout")

UNAUTHENTICATED = "missing or wrong API key: send the metadata 'authorization: Bearer <key>'"
REPLICA_HEADER = "x-hedgerow-replica"
REPLICA_TRAILER = "hedgerow-replica"
TOKENIZER_THREADS = 2  # as hedgerow serve's


class HedgerowReplica:
    """The deployment's class (``app.deployment`` wraps it for Serve). ``args``: the parsed
    ``hedgerow serve`` flags, devices already set for this replica; ``api_key``: None for none."""

    def __init__(self, args, api_key: str | None, proxy_config):
        from ray import serve

        from hedgerow.server.cli import build_engine, resolve_models
        from hedgerow.server.engine.async_engine import AsyncEngine
        from hedgerow.server.service.generation import GenerationService
        from hedgerow.server.service.metrics import Metrics
        from hedgerow.server.service.requests import ServiceConfig
        from hedgerow.server.service.serve import served_names

        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self.api_key = api_key
        self.proxy_config = proxy_config
        target, draft = resolve_models(args)  # this node's paths: the embedded pair is where hedgerow is installed
        engine, tokenizer = build_engine(args)
        target_name, draft_name = served_names(target, draft, args.served_model_name)
        config = ServiceConfig(target_name=target_name, draft_name=draft_name,
                               default_max_new_tokens=args.max_new_tokens, max_prompt_bytes=args.max_prompt_bytes)
        self.metrics = Metrics()
        self.engine = AsyncEngine(engine, self.metrics)
        self.pool = ThreadPoolExecutor(TOKENIZER_THREADS, thread_name_prefix="hedgerow-tokenizer")
        self.service = GenerationService(self.engine, tokenizer, config, self.pool, engine_died=self._engine_died)
        kv = {"target": 0, **({"draft": 0} if engine.draft is not None else {})}
        self.metrics.set_load(running=0, waiting=0, kv_slots=kv)  # every gauge exported from the start
        self.engine.start()
        # Prometheus: this replica's own /metrics, on a free port, listed for the scrape config
        self.metrics_http = self.metrics.serve(0, args.metrics_host)
        host = socket.gethostbyname(socket.gethostname()) if args.metrics_host in ("0.0.0.0", "::") else args.metrics_host
        self.metrics_address = f"{host}:{self.metrics_http.server_port}"
        register_replica(self.replica_id, self.metrics_address)
        log.info("replica %s serving %s, metrics on %s", self.replica_id, target_name, self.metrics_address)

    # --- HTTP: the OpenAI app ---------------------------------------------------------------------
    def __serve_build_asgi_app__(self):
        from hedgerow.server.proxy.app import create_app
        from hedgerow.server.scaleout.calls import LocalBackend

        app = create_app(self.proxy_config, backend=lambda config: LocalBackend(config, self.service))

        @app.middleware("http")
        async def name_the_replica(request, call_next):
            response = await call_next(request)
            response.headers[REPLICA_HEADER] = self.replica_id
            return response

        return app

    # --- gRPC: hedgerow.v1.Generation and grpc.health.v1.Health -------------------------------------
    async def Generate(self, request, grpc_context):
        context = self._enter(grpc_context)
        try:
            return await self.service.Generate(request, context) if context else pb.GenerateResponse()
        except Aborted as exc:
            return self._fail(grpc_context, exc, pb.GenerateResponse())
        finally:
            context and context.finish()

    async def GenerateStream(self, request, grpc_context):
        context = self._enter(grpc_context)
        if context is None:
            raise Aborted(grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED)
        try:
            async for message in self.service.GenerateStream(request, context):
                yield message
        except Aborted as exc:
            # Serve's proxy copies a stream's context onto the call with each message only: a status
            # after the last one (or with none) reaches the client only through an exception
            self._fail(grpc_context, exc, None)
            raise
        finally:
            context.finish()

    async def ModelInfo(self, request, grpc_context):
        context = self._enter(grpc_context)
        try:
            return await self.service.ModelInfo(request, context) if context else pb.ModelInfoResponse()
        except Aborted as exc:
            return self._fail(grpc_context, exc, pb.ModelInfoResponse())

    async def Check(self, request, grpc_context):
        """Health: SERVING while this replica takes requests (no key needed, as hedgerow serve)."""
        if request.service not in ("", "hedgerow.v1.Generation"):
            return self._fail(grpc_context, Aborted(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}"),
                              health_pb2.HealthCheckResponse())
        serving = self.service.refusing is None
        return health_pb2.HealthCheckResponse(
            status=health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING)

    async def Watch(self, request, grpc_context):
        """Health's stream: the status once. A replica cannot watch the deployment as a whole; Serve
        replaces a replica that fails ``check_health``, and the next ``Watch`` reaches a live one."""
        yield await self.Check(request, grpc_context)

    def _enter(self, grpc_context) -> CallContext | None:
        """The call's context for the service; None when the call is refused (no key)."""
        grpc_context.set_trailing_metadata([(REPLICA_TRAILER, self.replica_id)])
        metadata = grpc_context.invocation_metadata()
        if self.api_key is not None:
            header = next((v for k, v in metadata if k == "authorization"), None)
            if not bearer_matches(header, self.api_key):
                self.metrics.record_rejected("unauthenticated")
                self._fail(grpc_context, Aborted(grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED), None)
                return None
        return CallContext(metadata)

    @staticmethod
    def _fail(grpc_context, exc: Aborted, empty):
        """End the call with the service's status: set on Serve's context, which Serve's proxy copies
        onto the client's call, over what it would set itself. The call returns (an empty message,
        never sent with a status that is not OK) rather than raising: Serve logs every exception a
        replica raises with its traceback, and a bad request is not worth one."""
        grpc_context.set_code(exc.code)
        grpc_context.set_details(exc.details)
        return empty

    # --- what Serve and the tests call ------------------------------------------------------------
    def replica_info(self) -> dict:
        """Which replica answered, and where its metrics are (for tests and tools)."""
        return {"replica_id": self.replica_id, "metrics": self.metrics_address}

    def metrics_text(self) -> str:
        return self.metrics.text()

    def _engine_died(self) -> None:
        self.service.drain("the replica's engine stopped; Serve is replacing the replica")

    def check_health(self) -> None:
        if not self.engine._thread.is_alive():  # AsyncEngine has no public liveness check
            self._engine_died()
            raise RuntimeError("the engine thread stopped")

    async def __del__(self):
        """Serve stops a replica after its in-flight requests finished or its graceful shutdown
        timeout passed: requests still open end with ABORT."""
        unregister_replica(self.replica_id)
        self.service.close()
        await asyncio.to_thread(self.engine.close)
        self.metrics_http.shutdown()
        self.pool.shutdown(wait=False)
