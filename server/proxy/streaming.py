"""Streamed generations (``stream: true``) as server-sent events in OpenAI's chunk format.

The first gRPC message is read before the HTTP response starts: it decides the status, so a refused
request is a 4xx like its unary twin. Once the 200 is sent, a failure can only be an error event in
the stream, which still ends with ``data: [DONE]``.
"""

import asyncio
import json

import grpc
from fastapi.responses import StreamingResponse

from hedgerow.server.proxy.backend import call, cancel_on_disconnect, grpc_error
from hedgerow.server.proxy.convert import FINISH, Shape, stats, step_stats, usage
from hedgerow.server.proxy.schema import ApiError


def sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, separators=(',', ':'))}\n\n"


async def stream_response(request, rpc, shape: Shape, include_usage: bool, prompt_param: str,
                          steps: bool = False) -> StreamingResponse:
    """The HTTP response of a ``GenerateStream`` call, cancelled if the client goes away."""
    watch = asyncio.create_task(cancel_on_disconnect(request, rpc))
    try:  # the first message decides the HTTP status: a refusal is a 4xx, not an error event
        first = await call(rpc.read(), prompt_param=prompt_param)
    except BaseException:
        rpc.cancel()
        watch.cancel()
        raise
    if first is grpc.aio.EOF:
        watch.cancel()
        raise ApiError(500, "the server ended the stream without a response", type="server_error")
    return StreamingResponse(stream_events(rpc, watch, first, shape, include_usage, prompt_param, steps),
                             media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


async def stream_events(rpc, watch, first, shape: Shape, include_usage: bool, prompt_param: str,
                        steps: bool = False):
    """SSE lines of one streamed generation: a chunk per server message with text (``steps``: per
    server message, with its step's stats in ``hedgerow.step``, text or not), a last chunk with
    finish_reason and the stats, then (``include_usage``) one with ``choices: []`` and the usage, then
    ``[DONE]``. A failure after the first message becomes an error event. However it ends (done,
    failed, client gone), the gRPC call is cancelled if still open."""

    def event(chunk: dict) -> str:
        return sse({**chunk, "usage": None} if include_usage else chunk)

    try:
        if shape.chat:
            yield event(shape.chunk(None, role=True))
        msg, offset = first, 0
        while msg is not grpc.aio.EOF:
            logprobs = shape.logprobs_of(msg.logprobs, offset) if msg.logprobs else None
            offset += sum(len(e.token) for e in msg.logprobs)
            chunk = shape.chunk(msg.text, logprobs=logprobs)
            if steps and msg.HasField("step"):
                yield event({**chunk, "hedgerow": {"step": step_stats(msg.step)}})
            elif msg.text or logprobs:
                yield event(chunk)
            if (reason := FINISH.get(msg.finish_reason)) is not None:
                yield event({**shape.chunk(None, reason), "hedgerow": stats(msg.stats)})
                if include_usage:
                    yield sse({**shape.chunk(None), "choices": [], "usage": usage(msg.usage, msg.stats)})
                break
            msg = await rpc.read()
        else:
            raise ApiError(500, "the server ended the stream before its last message", type="server_error")
    except grpc.aio.AioRpcError as exc:
        yield sse(grpc_error(exc, prompt_param=prompt_param).body())
    except ApiError as exc:
        yield sse(exc.body())
    finally:
        rpc.cancel()
        watch.cancel()
    yield sse("[DONE]")
