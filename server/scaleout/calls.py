"""The Generation service called in process: what a replica's two front doors share.

A replica runs the same ``GenerationService`` as ``hedgerow serve`` (validation, tokenizing on worker
threads, stop strings, status codes, metrics). That service is written against a grpc.aio servicer
context, of which it uses two things: ``abort(code, details)``, which ends the call with a status,
and ``add_done_callback``. ``CallContext`` is those two things without a gRPC server behind them.

- Serve's gRPC proxy hands a replica the request message and a ``RayServegRPCContext``; the
  replica calls the service with a ``CallContext`` and copies a status the service ends with onto
  Serve's context (``replica``).
- The OpenAI app (``hedgerow.server.proxy.app``) in each replica reaches the service through
  ``LocalBackend``, which has the methods of the proxy's gRPC ``Backend`` and answers with calls
  shaped like grpc.aio's: awaitable (unary) or ``read()`` until ``grpc.aio.EOF`` (streaming), both
  with ``cancel()`` and ``done()``, failing with a real ``grpc.aio.AioRpcError``. The proxy's own
  mapping of statuses to HTTP errors (400, 429, 503, 504, 500) therefore applies unchanged, and a
  client that goes away cancels the call, which frees the sequence's KV slot, as over gRPC.
"""

from __future__ import annotations

import asyncio
import time

import grpc

from hedgerow.server.proxy.backend import _load_tokenizer, _tokenizer_source
from hedgerow.server.proxy.config import ProxyConfig

_END = object()  # a streamed call's last item, after its last message


class Aborted(Exception):
    """The service ended the call with a status (its ``context.abort``)."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(code, details)  # both in args: Ray pickles it back to Serve's proxy by them
        self.code = code
        self.details = details

    def __str__(self) -> str:
        return self.details


class CallContext:
    """The part of a grpc.aio ServicerContext that ``GenerationService`` uses."""

    def __init__(self, metadata=()):
        self.metadata = tuple(metadata)
        self._callbacks = []

    async def abort(self, code: grpc.StatusCode, details: str):
        raise Aborted(code, details)

    def add_done_callback(self, callback) -> None:
        self._callbacks.append(callback)

    def invocation_metadata(self):
        return self.metadata

    def finish(self) -> None:
        """The call is over (however it ended): run the callbacks, once."""
        callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            callback(self)


def rpc_error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details=details)


def _as_rpc_error(exc: BaseException) -> BaseException:
    if isinstance(exc, Aborted):
        return rpc_error(exc.code, exc.details)
    if isinstance(exc, asyncio.CancelledError):
        return rpc_error(grpc.StatusCode.CANCELLED, "Locally cancelled by application!")
    return exc


class UnaryCall:
    """``Generate`` in process, as a grpc.aio unary call: await it for the response."""

    def __init__(self, service, msg, timeout: float | None):
        self._context = CallContext()
        self._task = asyncio.ensure_future(asyncio.wait_for(service.Generate(msg, self._context), timeout))
        self._task.add_done_callback(lambda _: self._context.finish())

    def __await__(self):
        return self._result().__await__()

    async def _result(self):
        try:
            return await self._task
        except asyncio.TimeoutError:
            raise rpc_error(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded") from None
        except (Aborted, asyncio.CancelledError) as exc:
            raise _as_rpc_error(exc) from None

    def done(self) -> bool:
        return self._task.done()

    def cancel(self) -> bool:
        return self._task.cancel()


class StreamCall:
    """``GenerateStream`` in process, as a grpc.aio streaming call: ``read()`` each message, then
    ``grpc.aio.EOF``. A task pumps the service's messages into a queue, so that ``cancel()`` from
    another task (the proxy's disconnect watch) ends a ``read()`` waiting on it."""

    def __init__(self, service, msg, timeout: float | None):
        self._context = CallContext()
        self._queue: asyncio.Queue = asyncio.Queue()
        self._pump = asyncio.ensure_future(self._run(service.GenerateStream(msg, self._context)))
        self._deadline = (asyncio.get_running_loop().call_later(timeout, self._expire)
                          if timeout is not None else None)
        self._expired = False
        self._pump.add_done_callback(self._ended)

    async def _run(self, messages) -> None:
        async for message in messages:
            self._queue.put_nowait(message)

    def _expire(self) -> None:
        self._expired = True
        self._pump.cancel()

    def _ended(self, task: asyncio.Task) -> None:
        self._context.finish()
        if self._deadline is not None:
            self._deadline.cancel()
        if self._expired:
            self._queue.put_nowait(rpc_error(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded"))
        elif task.cancelled():
            self._queue.put_nowait(_as_rpc_error(asyncio.CancelledError()))
        elif task.exception() is not None:
            self._queue.put_nowait(_as_rpc_error(task.exception()))
        self._queue.put_nowait(_END)

    async def read(self):
        item = await self._queue.get()
        if item is _END:
            self._queue.put_nowait(_END)  # every later read is EOF too
            return grpc.aio.EOF
        if isinstance(item, BaseException):
            raise item
        return item

    def done(self) -> bool:
        return self._pump.done()

    def cancel(self) -> bool:
        return self._pump.cancel()


class LocalBackend:
    """The proxy's ``Backend`` (hedgerow.server.proxy.backend) for a service in this process: the
    same methods, no channel. ``serving()`` is the service's own view: not draining, engine alive."""

    def __init__(self, config: ProxyConfig, service):
        self.config = config
        self.service = service
        self.created = int(time.time())
        self._tokenizer = None
        self._lock = asyncio.Lock()

    async def generate(self, msg, *, stream: bool, timeout: float | None):
        return StreamCall(self.service, msg, timeout) if stream else UnaryCall(self.service, msg, timeout)

    async def info(self):
        return self.service.info

    async def model_id(self) -> str:
        return self.config.served_model_name or self.service.info.target

    async def tokenizer(self):
        async with self._lock:  # as the proxy's Backend: one load, however many requests ask at once
            if self._tokenizer is None:
                name = self.service.info.target
                source = self.config.tokenizer or _tokenizer_source(name)
                self._tokenizer = await asyncio.to_thread(_load_tokenizer, source, name, self.config.chat_template)
        return self._tokenizer

    async def warm(self) -> None:
        await self.tokenizer()

    async def serving(self) -> bool:
        return self.service.refusing is None

    async def close(self) -> None:
        pass
