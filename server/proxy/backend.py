"""The proxy's gRPC client side: the channel to `hedgerow serve`, what the server reports about its
model, the tokenizer for chat templates, and a failed gRPC call as the HTTP error a client sees.

Everything that knows gRPC is here, so that the routes deal in ``ApiError`` only: gRPC
INVALID_ARGUMENT -> 400, RESOURCE_EXHAUSTED -> 429 (413 when the message itself was too large),
UNAVAILABLE -> 503, DEADLINE_EXCEEDED -> 504, anything else -> 500, and a 400 names the OpenAI
parameter rather than the proto field. A 503 says the server is unavailable and nothing of where it
is (the log has gRPC's own words). A call whose HTTP client goes away is cancelled, so the server
frees the sequence's KV slot at once.

Reconnecting: the channel retries a lost server at most ``MAX_BACKOFF_MS`` apart (gRPC's default
backoff grows to two minutes, so a proxy stayed down long after its server came back), and a request
that finds the channel not connected waits up to ``CONNECT_WAIT`` seconds for it before its 503: a
server that is back is used within about a second, one that is down costs each client that second.
"""

import asyncio
import importlib.resources
import logging
import os
import re
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from hedgerow.server.proxy.config import ProxyConfig
from hedgerow.server.proxy.schema import ApiError
from hedgerow.server.rpc import generation_pb2 as pb
from hedgerow.server.rpc import generation_pb2_grpc as pb_grpc

log = logging.getLogger("hedgerow.proxy")

# the embedded pair's name as `hedgerow serve` reports it (server/service/serve.py EMBEDDED_NAMES;
# a test checks they agree): its tokenizer is the package's own copy of the pair
EMBEDDED_NAME = "hedgerow-embedded"
MAX_BACKOFF_MS = 1000
CONNECT_WAIT = 1.5  # seconds
CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", MAX_BACKOFF_MS),
    ("grpc.max_receive_message_length", -1),  # replies come from our own server
]
UNAVAILABLE_MESSAGE = "the Hedgerow server is unavailable (down, starting or shutting down): retry later"


class Backend:
    """The channel to the gRPC server, its ModelInfo and the tokenizer, fetched on first use and
    kept. Create it on the event loop that serves requests."""

    def __init__(self, config: ProxyConfig):
        self.config = config
        if config.grpc_tls_ca is not None:
            credentials = grpc.ssl_channel_credentials(root_certificates=config.grpc_tls_ca)
            self.channel = grpc.aio.secure_channel(config.grpc_target, credentials, options=CHANNEL_OPTIONS)
        else:
            self.channel = grpc.aio.insecure_channel(config.grpc_target, options=CHANNEL_OPTIONS)
        self.metadata = (("authorization", f"Bearer {config.grpc_api_key}"),) if config.grpc_api_key else None
        self.stub = pb_grpc.GenerationStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)
        self.created = int(time.time())
        self._info = None
        self._tokenizer = None
        self._lock = asyncio.Lock()

    async def ready(self) -> None:
        """Wait up to CONNECT_WAIT for the channel to be connected; 503 if it is not by then."""
        if self.channel.get_state(try_to_connect=True) is grpc.ChannelConnectivity.READY:
            return
        try:
            await asyncio.wait_for(self.channel.channel_ready(), CONNECT_WAIT)
        except asyncio.TimeoutError:
            raise ApiError(503, UNAVAILABLE_MESSAGE, type="server_error", code="unavailable") from None

    async def generate(self, msg: pb.GenerateRequest, *, stream: bool, timeout: float | None):
        """The ``Generate`` or ``GenerateStream`` call of ``msg``, once the channel is connected."""
        await self.ready()
        method = self.stub.GenerateStream if stream else self.stub.Generate
        return method(msg, timeout=timeout, metadata=self.metadata)

    async def info(self):
        if self._info is None:
            await self.ready()
            self._info = await self.stub.ModelInfo(pb.ModelInfoRequest(), timeout=10, metadata=self.metadata)
        return self._info

    async def model_id(self) -> str:
        return self.config.served_model_name or (await self.info()).target

    async def tokenizer(self):
        async with self._lock:  # one load, however many requests ask at once
            if self._tokenizer is None:
                name = (await self.info()).target
                source = self.config.tokenizer or _tokenizer_source(name)
                self._tokenizer = await asyncio.to_thread(_load_tokenizer, source, name, self.config.chat_template)
        return self._tokenizer

    async def warm(self) -> None:
        """Fetch ModelInfo and load the tokenizer ahead of the first chat request, if the server is
        up; if not, the first request that needs them tries again."""
        try:
            await self.tokenizer()
        except Exception as exc:
            log.info("not ready yet: %s", getattr(exc, "message", exc))

    async def serving(self) -> bool:
        try:
            reply = await self.health.Check(health_pb2.HealthCheckRequest(service="hedgerow.v1.Generation"), timeout=5)
        except Exception:
            return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING

    async def close(self) -> None:
        await self.channel.close()


def _tokenizer_source(name: str) -> str:
    """Where the tokenizer of the model the server names lives: the embedded pair's folder in this
    package, or the name itself (a Hugging Face id; a folder's name only if it is a folder here)."""
    if name == EMBEDDED_NAME:
        return str(importlib.resources.files("hedgerow.server.embedded").joinpath("target"))
    return name


def _load_tokenizer(source: str, model: str, chat_template: str | None):
    from transformers import AutoTokenizer  # slow to import, and only chat needs it

    try:
        tokenizer = AutoTokenizer.from_pretrained(os.path.expanduser(source))
    except (OSError, ValueError) as exc:  # the reason names files of this machine: for the log only
        log.warning("cannot load the tokenizer from %s: %s", source, exc)
        raise ApiError(500, f"the proxy cannot load the tokenizer of {model!r}: start it with --tokenizer PATH",
                       type="server_error", code="tokenizer_unavailable") from None
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    return tokenizer


async def call(coro, *, prompt_param: str = "prompt"):
    """Await a gRPC call, turning its failure into an ApiError."""
    try:
        return await coro
    except grpc.aio.AioRpcError as exc:
        raise grpc_error(exc, prompt_param=prompt_param) from None


async def cancel_on_disconnect(request, rpcs: list, every: float = 0.25) -> None:
    """Cancel the gRPC calls of a request when the HTTP client goes away (the server then frees
    their KV slots)."""
    while not all(rpc.done() for rpc in rpcs):
        if await request.is_disconnected():
            for rpc in rpcs:
                rpc.cancel()
            return
        await asyncio.sleep(every)


async def call_all(rpcs: list, *, prompt_param: str = "prompt") -> list:
    """Await every call (each a prompt of a batch); the first failure cancels the others and is
    raised as an ApiError."""
    try:
        return await asyncio.gather(*(call(rpc, prompt_param=prompt_param) for rpc in rpcs))
    except BaseException:
        for rpc in rpcs:
            rpc.cancel()
        raise


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


TOO_LARGE = re.compile(r"(?:Received|Sent|Decompressed) message larger than max(?: \((\d+) vs\. (\d+)\))?")


def grpc_error(exc, *, prompt_param: str = "prompt") -> ApiError:
    """An ``AioRpcError`` as the client should see it: the server's own refusals with its words,
    anything from gRPC itself (which may name addresses) in the proxy's."""
    code = exc.code()
    status, kind = STATUS.get(code.name, (500, "server_error"))
    detail, param = exc.details() or code.name, None
    if code.name == "UNAVAILABLE":
        log.warning("the gRPC server is unavailable: %s", detail)
        detail = UNAVAILABLE_MESSAGE
    elif code.name == "RESOURCE_EXHAUSTED" and (size := TOO_LARGE.search(detail)):
        limit = f" ({size[1]} bytes; the server takes at most {size[2]})" if size[1] else ""
        return ApiError(413, f"the request is too large for the Hedgerow server{limit}: send a shorter prompt",
                        param=prompt_param, code="request_too_large")
    elif code.name == "UNAUTHENTICATED":
        return ApiError(500, "the Hedgerow server refused the proxy's key: start the proxy with the server's key "
                             "(--grpc-api-key-file, or the same $HEDGEROW_API_KEY)", type="server_error",
                        code="backend_unauthenticated")
    elif status == 400:
        param, detail = _openai_param(detail, prompt_param)
    elif code.name not in ("INTERNAL", "DEADLINE_EXCEEDED"):
        log.warning("the gRPC call failed with %s: %s", code.name, detail)
        detail = f"the Hedgerow server failed this request ({code.name})"
    return ApiError(status, detail, type=kind, param=param, code=code.name.lower())


def _openai_param(detail: str, prompt_param: str) -> tuple[str | None, str]:
    word = detail.split(" ", 1)[0].rstrip(":")
    if word.startswith("prompt"):  # "prompt_token_ids[3] = ..." reads "prompt[3] = ..." for /v1/completions
        return prompt_param, detail.replace("prompt_token_ids", "prompt", 1) if prompt_param == "prompt" else detail
    if word == "n":  # "n must be in ...", "n = 4 samples of ..."
        return "n", detail
    if detail.startswith("speculation mode"):
        return "hedgerow.speculation.mode", detail
    for old, new in RENAMES:
        if word.startswith(old):
            name = new + word[len(old):]
            return name.split("[")[0], name + detail[len(word):]
    return None, detail
