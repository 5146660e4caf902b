"""The gRPC server of ``hedgerow serve``: the Generation service (``generation``), the standard
health service and server reflection, on one grpc.aio server, and how it stops.

Start (``start_server``): the engine thread, the service, health SERVING. The port is exclusive
(``grpc.so_reuseport`` 0: a second server on the same port fails to start instead of silently
sharing the traffic); requests are bounded on the wire (``ServiceConfig.message_limit``, which also
bounds what a compressed request inflates to); an API key and TLS are optional (``auth``).

Stop (``GrpcServer.stop``), on SIGTERM: health says NOT_SERVING at once and keeps answering; new
requests get UNAVAILABLE; those in flight finish, for at most ``grace`` seconds or until ``force`` is
set (a second signal). Then the engine is closed, and each request still open gets a last message
with FINISH_REASON_ABORT and the tokens so far before the server stops.

If the engine thread dies (a bug beyond one request), health says NOT_SERVING, requests get
UNAVAILABLE and ``died`` is set, on which ``hedgerow serve`` exits non-zero for a supervisor to
restart it.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from hedgerow.server.engine.async_engine import AsyncEngine
from hedgerow.server.engine.engine import Engine
from hedgerow.server.errors import HedgerowError
from hedgerow.server.service.auth import ApiKeyInterceptor, server_credentials
from hedgerow.server.service.generation import GenerationService
from hedgerow.server.service.metrics import Metrics
from hedgerow.server.service.requests import ServiceConfig
from hedgerow.server.service.wire import SERVICE_NAME, add_generation_service

log = logging.getLogger("hedgerow.grpc")

LAST_MESSAGES_SECONDS = 5.0  # after a forced stop, for open requests to send FINISH_REASON_ABORT
SEND_SECONDS = 1.0  # for responses already returned by their handler to reach the client
WATCH_SECONDS = 0.5  # how often the engine thread is checked for life
TOKENIZER_THREADS = 2  # worker threads that tokenize and detokenize


@dataclass
class GrpcServer:
    server: grpc.aio.Server
    port: int
    engine: AsyncEngine
    health: health.aio.HealthServicer
    service: GenerationService
    pool: ThreadPoolExecutor
    died: asyncio.Event = field(default_factory=asyncio.Event)  # the engine thread stopped by itself
    _tasks: set[asyncio.Task] = field(default_factory=set)  # the watch, and health updates it starts

    async def stop(self, grace: float | None, force: asyncio.Event | None = None) -> bool:
        """Drain, then stop (module docstring). ``grace`` None: end open requests at once. Returns
        whether every request finished on its own."""
        await self.health.enter_graceful_shutdown()  # NOT_SERVING, and health goes on answering
        self.service.drain()
        drained = grace is not None and await _first(self.service.idle, force, grace)
        if not drained:
            self.service.close()
            await asyncio.to_thread(self.engine.close)  # each open request gets its ABORT update
            await _first(self.service.idle, None, LAST_MESSAGES_SECONDS)
        for task in self._tasks:
            task.cancel()
        await self.server.stop(SEND_SECONDS)
        self.service.close()
        await asyncio.to_thread(self.engine.close)
        self.pool.shutdown(wait=False)
        return drained

    def engine_died(self) -> None:
        """Called when the engine thread is found dead: refuse everything, and say so."""
        if self.service.closing or self.died.is_set():
            return
        log.error("the engine thread stopped: refusing requests; the process should be restarted")
        self.service.drain("the server's engine stopped; the server is restarting")
        self.died.set()
        self._tasks.add(asyncio.get_running_loop().create_task(self.health.enter_graceful_shutdown()))

    async def watch(self) -> None:
        """Check the engine thread every WATCH_SECONDS; an idle server finds out it died too."""
        while True:
            await asyncio.sleep(WATCH_SECONDS)
            if not self.engine._thread.is_alive():  # AsyncEngine has no public liveness check
                self.engine_died()
                return


async def _first(event: asyncio.Event, force: asyncio.Event | None, timeout: float) -> bool:
    """Wait until ``event`` is set (True), or ``force`` is set or ``timeout`` passes (False)."""
    waits = {asyncio.ensure_future(event.wait())}
    if force is not None:
        waits.add(asyncio.ensure_future(force.wait()))
    done, pending = await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    for task in pending:
        task.cancel()
    return event.is_set()


async def start_server(engine: Engine, tokenizer, *, host: str = "127.0.0.1", port: int = 0,
                       config: ServiceConfig = ServiceConfig(), metrics: Metrics | None = None,
                       api_key: str | None = None, tls: tuple[bytes, bytes] | None = None) -> GrpcServer:
    """Start the engine thread and a grpc.aio server with the Generation, health and reflection
    services; ``port`` 0 picks a free port (see ``.port``). ``api_key``: calls but health's need
    ``authorization: Bearer KEY``; ``tls``: (certificate chain, private key), PEM."""
    metrics = metrics if metrics is not None else Metrics()
    async_engine = AsyncEngine(engine, metrics)
    options = [("grpc.so_reuseport", 0),
               ("grpc.max_receive_message_length", config.message_limit(engine.config.max_model_len))]
    interceptors = [ApiKeyInterceptor(api_key, lambda: metrics.record_rejected("unauthenticated"))] if api_key else []
    server = grpc.aio.server(options=options, interceptors=interceptors)
    pool = ThreadPoolExecutor(TOKENIZER_THREADS, thread_name_prefix="hedgerow-tokenizer")
    service = GenerationService(async_engine, tokenizer, config, pool)
    add_generation_service(service, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server)
    address = f"{host}:{port}"
    try:
        bound = server.add_secure_port(address, server_credentials(*tls)) if tls else server.add_insecure_port(address)
    except RuntimeError:  # grpc logs why (address in use, no such address)
        bound = 0
    if bound == 0:
        pool.shutdown()
        flags = "--host/--port" + (", --tls-cert/--tls-key" if tls else "")
        raise HedgerowError(f"cannot listen on {address} ({flags}): see the line above")
    kv = {"target": 0, **({"draft": 0} if engine.draft is not None else {})}
    metrics.set_load(running=0, waiting=0, kv_slots=kv)  # every gauge exported from the start
    async_engine.start()
    await server.start()
    running = GrpcServer(server, bound, async_engine, health_servicer, service, pool)
    service.engine_died = running.engine_died
    running._tasks.add(asyncio.create_task(running.watch()))
    return running
