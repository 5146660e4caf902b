"""The proxy's gRPC client side: the channel to `hedgerow serve`, what the server reports about its
model, the tokenizer for chat templates, and a failed gRPC call as the HTTP error a client sees.

Everything that knows gRPC is here, so that the routes deal in ``ApiError`` only: gRPC
INVALID_ARGUMENT -> 400, RESOURCE_EXHAUSTED -> 429, UNAVAILABLE -> 503, DEADLINE_EXCEEDED -> 504,
anything else -> 500, and a 400 names the OpenAI parameter rather than the proto field. A call whose
HTTP client goes away is cancelled, so the server frees the sequence's KV slot at once.
"""

import asyncio
import logging
import os
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from hedgerow.server.proxy.config import ProxyConfig
from hedgerow.server.proxy.schema import ApiError
from hedgerow.server.rpc import generation_pb2 as pb
from hedgerow.server.rpc import generation_pb2_grpc as pb_grpc

log = logging.getLogger("hedgerow.proxy")


class Backend:
    """The channel to the gRPC server, its ModelInfo and the tokenizer, fetched on first use and
    kept. Create it on the event loop that serves requests."""

    def __init__(self, config: ProxyConfig):
        self.config = config
        self.channel = grpc.aio.insecure_channel(config.grpc_target)
        self.stub = pb_grpc.GenerationStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)
        self.created = int(time.time())
        self._info = None
        self._tokenizer = None
        self._lock = asyncio.Lock()

    async def info(self):
        if self._info is None:
            self._info = await self.stub.ModelInfo(pb.ModelInfoRequest(), timeout=10)
        return self._info

    async def model_id(self) -> str:
        return self.config.served_model_name or (await self.info()).target

    async def tokenizer(self):
        async with self._lock:  # one load, however many requests ask at once
            if self._tokenizer is None:
                path = self.config.tokenizer or (await self.info()).target
                self._tokenizer = await asyncio.to_thread(_load_tokenizer, path, self.config.chat_template)
        return self._tokenizer

    async def warm(self) -> None:
        """Fetch ModelInfo and load the tokenizer ahead of the first chat request, if the server is
        up; if not, the first request that needs them tries again."""
        try:
            await self.tokenizer()
        except Exception as exc:
            log.info("not ready yet: %s", exc)

    async def serving(self) -> bool:
        try:
            reply = await self.health.Check(health_pb2.HealthCheckRequest(service="hedgerow.v1.Generation"), timeout=5)
        except Exception:
            return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING

    async def close(self) -> None:
        await self.channel.close()


def _load_tokenizer(path: str, chat_template: str | None):
    from transformers import AutoTokenizer  # slow to import, and only chat needs it

    try:
        tokenizer = AutoTokenizer.from_pretrained(os.path.expanduser(path))
    except (OSError, ValueError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ApiError(500, f"the proxy cannot load the tokenizer from {path!r} ({first}): start it with "
                            f"--tokenizer PATH", type="server_error", code="tokenizer_unavailable") from None
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    return tokenizer


async def call(coro, *, prompt_param: str = "prompt"):
    """Await a gRPC call, turning its failure into an ApiError."""
    try:
        return await coro
    except grpc.aio.AioRpcError as exc:
        raise grpc_error(exc, prompt_param=prompt_param) from None


async def cancel_on_disconnect(request, rpc, every: float = 0.25) -> None:
    """Cancel the gRPC call when the HTTP client goes away (the server then frees the KV slot)."""
    while not rpc.done():
        if await request.is_disconnected():
            rpc.cancel()
            return
        await asyncio.sleep(every)


STATUS = {  # gRPC status name -> (HTTP status, OpenAI error type)
    "INVALID_ARGUMENT": (400, "invalid_request_error"),
    "RESOURCE_EXHAUSTED": (429, "rate_limit_error"),
    "UNAVAILABLE": (503, "server_error"),
    "DEADLINE_EXCEEDED": (504, "server_error"),
}
# The server names proto fields, a client knows OpenAI parameters: "sampling.top_p must be ..."
# reads "top_p must be ...". The first prefix that matches wins.
RENAMES = (("sampling.", ""), ("stopping.max_new_tokens", "max_tokens"), ("stopping.", ""),
           ("speculation.", "hedgerow.speculation."), ("max_new_tokens", "max_tokens"))


def grpc_error(exc, *, prompt_param: str = "prompt") -> ApiError:
    """An ``AioRpcError`` as the client should see it."""
    code = exc.code()
    status, kind = STATUS.get(code.name, (500, "server_error"))
    detail, param = exc.details() or code.name, None
    if code.name == "UNAVAILABLE":
        detail = f"the Hedgerow server is unavailable: {detail}"
    elif status == 400:
        param, detail = _openai_param(detail, prompt_param)
    return ApiError(status, detail, type=kind, param=param, code=code.name.lower())


def _openai_param(detail: str, prompt_param: str) -> tuple[str | None, str]:
    word = detail.split(" ", 1)[0].rstrip(":")
    if word.startswith("prompt"):  # "prompt_token_ids[3] = ..." reads "prompt[3] = ..." for /v1/completions
        return prompt_param, detail.replace("prompt_token_ids", "prompt", 1) if prompt_param == "prompt" else detail
    if detail.startswith("speculation mode"):
        return "hedgerow.speculation.mode", detail
    for old, new in RENAMES:
        if word.startswith(old):
            name = new + word[len(old):]
            return name.split("[")[0], name + detail[len(word):]
    return None, detail
