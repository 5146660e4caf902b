"""A live gRPC server for tests: Hedgerow's service on its own event-loop thread, a sync stub."""

from __future__ import annotations

import asyncio
import threading

import grpc

from hedgerow.server.service.grpc_service import start_server
from hedgerow.server.service.metrics import Metrics
from hedgerow.server.rpc import generation_pb2_grpc as pb_grpc


class LiveServer:
    def __init__(self, engine, tokenizer, **kw):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.metrics = kw.pop("metrics", None) or Metrics()
        self.server = self._run(start_server(engine, tokenizer, port=0, metrics=self.metrics, **kw))
        self.address = f"127.0.0.1:{self.server.port}"
        self.channel = grpc.insecure_channel(self.address)
        self.stub = pb_grpc.GenerationStub(self.channel)

    def _run(self, coro, timeout=60):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self):
        self.channel.close()
        self._run(self.server.stop(None))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
