"""Streamed generations (``stream: true``) as server-sent events in OpenAI's chunk format.

The first gRPC message of each call (one per prompt) is read before the HTTP response starts: it
decides the status, so a refused request is a 4xx like its unary twin. Choices interleave, each
chunk carrying its choice's index. Once the 200 is sent, a failure can only be an error event in
the stream, which still ends with ``data: [DONE]``.
"""

import asyncio
import json

import grpc
from fastapi.responses import StreamingResponse

from hedgerow.server.aio import merge
from hedgerow.server.proxy.backend import call, cancel_on_disconnect, grpc_error
from hedgerow.server.proxy.convert import FINISH, Shape, stats, step_stats, total_usage, usage
from hedgerow.server.proxy.schema import ApiError


def sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, separators=(',', ':'))}\n\n"


async def stream_response(request, rpcs: list, shape: Shape, include_usage: bool, prompt_param: str,
                          steps: bool = False, n: int = 1) -> StreamingResponse:
    """The HTTP response of a request's ``GenerateStream`` calls (one per prompt, ``n`` samples
    each), cancelled if the client goes away."""
    watch = asyncio.create_task(cancel_on_disconnect(request, rpcs))
    try:  # the first messages decide the HTTP status: a refusal is a 4xx, not an error event
        firsts = [await call(rpc.read(), prompt_param=prompt_param) for rpc in rpcs]
    except BaseException:
        for rpc in rpcs:
            rpc.cancel()
        watch.cancel()
        raise
    if any(first is grpc.aio.EOF for first in firsts):
        watch.cancel()
        raise ApiError(500, "the server ended the stream without a response", type="server_error")
    return StreamingResponse(stream_events(rpcs, watch, firsts, shape, include_usage, prompt_param, steps, n),
                             media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


async def stream_events(rpcs: list, watch, firsts: list, shape: Shape, include_usage: bool, prompt_param: str,
                        steps: bool = False, n: int = 1):
    """SSE lines of a streamed request: per server message, a chunk of its choice (prompt p's sample
    i is choice ``p * n + i``) with text (``steps``: every message, with its step's stats in
    ``hedgerow.step``, text or not); per choice a last chunk with its finish_reason and stats; after
    every choice's, (``include_usage``) one with ``choices: []`` and the usage of all, then ``[DONE]``.
    A failure after the first messages becomes an error event. However it ends (done, failed,
    client gone), the gRPC calls are cancelled if still open."""

    def event(chunk: dict) -> str:
        return sse({**chunk, "usage": None} if include_usage else chunk)

    choices = len(rpcs) * n
    try:
        if shape.chat:
            for k in range(choices):
                yield event(shape.chunk(None, role=True, index=k))
        offsets, finals = [0] * choices, []
        async for p, msg in merge_reads(rpcs, firsts):
            k = p * n + msg.index
            logprobs = shape.logprobs_of(msg.logprobs, offsets[k]) if msg.logprobs else None
            offsets[k] += sum(len(e.token) for e in msg.logprobs)
            chunk = shape.chunk(msg.text, logprobs=logprobs, index=k)
            if steps and msg.HasField("step"):
                yield event({**chunk, "hedgerow": {"step": step_stats(msg.step)}})
            elif msg.text or logprobs:
                yield event(chunk)
            if (reason := FINISH.get(msg.finish_reason)) is not None:
                yield event({**shape.chunk(None, reason, index=k), "hedgerow": stats(msg.stats)})
                finals.append(msg)
        if len(finals) < choices:
            raise ApiError(500, "the server ended the stream before its last message", type="server_error")
        if include_usage:
            yield sse({**shape.chunk(None), "choices": [], "usage": usage(*total_usage(finals))})
    except grpc.aio.AioRpcError as exc:
        yield sse(grpc_error(exc, prompt_param=prompt_param).body())
    except ApiError as exc:
        yield sse(exc.body())
    finally:
        for rpc in rpcs:
            rpc.cancel()
        watch.cancel()
    yield sse("[DONE]")


def merge_reads(rpcs: list, firsts: list):
    """``(p, message)`` of every call as the messages come, each call's in order, starting with its
    first (already read); until every call has ended. A failed read is raised at once."""
    return merge([_reads(rpc, first) for rpc, first in zip(rpcs, firsts)])


async def _reads(rpc, first):
    msg = first
    while msg is not grpc.aio.EOF:
        yield msg
        msg = await rpc.read()
