"""serve an OpenAI-compatible HTTP API (completions, chat, SSE streaming) in front of `hedgerow serve`

    hedgerow proxy --grpc 127.0.0.1:50051 [--host 127.0.0.1] [--port 8000] [--api-key KEY]

Routes: ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions`` (``stream: true``
gives server-sent events in OpenAI's chunk format, ending with ``data: [DONE]``), and ``GET /health``
(no key needed; 503 unless the gRPC server reports SERVING). What is accepted and refused is listed
in ``server.openai_schema``.

Each HTTP request is one gRPC call (``Generate``, or ``GenerateStream`` when streaming) to the server,
which tokenizes, generates and applies stop strings. The proxy itself only needs the tokenizer for
chat: it renders the model's chat template and sends token ids. The tokenizer is loaded from the model
path the server reports (``ModelInfo.target``) unless ``--tokenizer`` names one; nothing is asked of
the server before the first request, so the proxy starts even while the server is down.

Mapping: finish reasons EOS and STOP -> ``"stop"``, LENGTH -> ``"length"``, ABORT (server shutting
down) -> ``"abort"``; gRPC INVALID_ARGUMENT -> 400, RESOURCE_EXHAUSTED -> 429, UNAVAILABLE -> 503,
DEADLINE_EXCEEDED -> 504, anything else -> 500. A client that disconnects cancels its gRPC call, so
the server frees the sequence's KV slot at once. Every response carries a ``hedgerow`` object with
the request's speculation stats (verify_steps, draft_tokens, accepted_tokens, acceptance_rate).
"""

# No `from __future__ import annotations`: FastAPI reads the endpoints' annotations at run time, and
# some name classes imported inside create_app (fastapi is imported only when the proxy runs).
import argparse
import asyncio
import hmac
import json
import logging
import os
import signal
import socket
import sys
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from hedgerow.server.engine.errors import HedgerowError
from hedgerow.server.proxy.schema import ApiError, ChatCompletionRequest, CompletionRequest, bad

log = logging.getLogger("hedgerow.proxy")


@dataclass(frozen=True)
class ProxyConfig:
    grpc_target: str = "127.0.0.1:50051"
    api_key: str | None = None  # None: no key needed
    tokenizer: str | None = None  # None: the model path the server reports
    served_model_name: str | None = None  # None: the server's target model name
    chat_template: str | None = None  # overrides the tokenizer's
    request_timeout: float | None = 600.0  # gRPC deadline per request; None: none


# --- the gRPC side -------------------------------------------------------------------------------
class Backend:
    """The channel to the gRPC server, its ModelInfo and the tokenizer, fetched on first use and
    kept. Create it on the event loop that serves requests."""

    def __init__(self, config: ProxyConfig):
        import grpc
        from grpc_health.v1 import health_pb2_grpc

        from hedgerow.server.rpc import generation_pb2_grpc as pb_grpc

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
            from hedgerow.server.rpc import generation_pb2 as pb

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
        from grpc_health.v1 import health_pb2

        try:
            reply = await self.health.Check(health_pb2.HealthCheckRequest(service="hedgerow.v1.Generation"), timeout=5)
        except Exception:
            return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING

    async def close(self) -> None:
        await self.channel.close()


def _load_tokenizer(path: str, chat_template: str | None):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(os.path.expanduser(path))
    except (OSError, ValueError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ApiError(500, f"the proxy cannot load the tokenizer from {path!r} ({first}): start it with "
                            f"--tokenizer PATH", type="server_error", code="tokenizer_unavailable") from None
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    return tokenizer


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


# --- OpenAI bodies -------------------------------------------------------------------------------
FINISH = {1: "stop", 2: "length", 3: "stop", 4: "abort"}  # pb.FinishReason -> OpenAI finish_reason


def to_proto(body, request_id: str, *, prompt: str | list[int]):
    from hedgerow.server.rpc import generation_pb2 as pb

    msg = pb.GenerateRequest(request_id=request_id)
    if isinstance(prompt, str):
        msg.prompt = prompt
    else:
        msg.prompt_token_ids.extend(prompt)
    for name in ("temperature", "top_k", "top_p", "seed"):
        if (value := getattr(body, name)) is not None:
            setattr(msg.sampling, name, value)
    if (n := body.new_tokens()) is not None:
        msg.stopping.max_new_tokens = n
    msg.stopping.stop.extend(body.stops())
    msg.stopping.ignore_eos = body.ignore_eos
    spec = body.hedgerow.speculation if body.hedgerow else None
    if spec is not None:
        msg.speculation.SetInParent()
        if spec.mode is not None:
            msg.speculation.mode = {"off": pb.SPECULATION_MODE_OFF, "chain": pb.SPECULATION_MODE_CHAIN,
                                    "tree": pb.SPECULATION_MODE_TREE}[spec.mode]
        if spec.max_draft_tokens is not None:
            msg.speculation.max_draft_tokens = spec.max_draft_tokens
        if spec.tree_budget is not None:
            msg.speculation.tree_budget = spec.tree_budget
    return msg


def usage(u) -> dict:
    return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
            "total_tokens": u.prompt_tokens + u.completion_tokens}


def stats(s) -> dict:
    rate = s.accepted_tokens / s.draft_tokens if s.draft_tokens else None
    return {"verify_steps": s.verify_steps, "draft_tokens": s.draft_tokens, "accepted_tokens": s.accepted_tokens,
            "acceptance_rate": rate}


@dataclass(frozen=True)
class Shape:
    """How completions and chat differ on the wire."""

    chat: bool
    id: str
    model: str
    created: int

    def _head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def response(self, resp) -> dict:
        reason = FINISH.get(resp.finish_reason)
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": resp.text},
                      "logprobs": None, "finish_reason": reason}
        else:
            choice = {"index": 0, "text": resp.text, "logprobs": None, "finish_reason": reason}
        return {**self._head("chat.completion" if self.chat else "text_completion"), "choices": [choice],
                "usage": usage(resp.usage), "hedgerow": stats(resp.stats)}

    def chunk(self, text: str | None, reason: str | None = None, *, role: bool = False) -> dict:
        if self.chat:
            delta = {"role": "assistant", "content": ""} if role else ({} if text is None else {"content": text})
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": reason}
        return {**self._head("chat.completion.chunk" if self.chat else "text_completion"), "choices": [choice]}


def sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, separators=(',', ':'))}\n\n"


# --- the app -------------------------------------------------------------------------------------
def create_app(config: ProxyConfig):
    from fastapi import Depends, FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException

    @asynccontextmanager
    async def lifespan(app):
        app.state.backend = backend = Backend(config)
        warm = asyncio.create_task(backend.warm())
        try:
            yield
        finally:
            warm.cancel()
            await backend.close()

    app = FastAPI(title="Hedgerow OpenAI-compatible proxy", lifespan=lifespan)

    def error(exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(ApiError)
    async def _api_error(request, exc: ApiError):
        return error(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        return error(validation_error(exc.errors()))

    @app.exception_handler(HTTPException)
    async def _http(request, exc: HTTPException):
        return error(ApiError(exc.status_code, str(exc.detail), code=str(exc.status_code)))

    def authorize(request: Request) -> None:
        if config.api_key is None:
            return
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), config.api_key.encode()):
            raise ApiError(401, "Incorrect API key provided: send 'Authorization: Bearer <key>' with the key "
                                "the proxy was started with (--api-key)", code="invalid_api_key")

    async def call(coro, **kw):
        """Await a gRPC call, turning its failure into an ApiError."""
        import grpc

        try:
            return await coro
        except grpc.aio.AioRpcError as exc:
            raise grpc_error(exc, **kw) from None

    async def served_model(requested: str | None = None) -> str:
        model = await call(app.state.backend.model_id())
        if requested is not None and requested != model:
            raise ApiError(404, f"The model {requested!r} does not exist: this server serves {model!r}",
                           param="model", code="model_not_found")
        return model

    async def model_card() -> dict:
        backend = app.state.backend
        info = await call(backend.info())
        spec = info.default_speculation
        return {"id": await served_model(), "object": "model", "created": backend.created, "owned_by": "hedgerow",
                "hedgerow": {"target": info.target, "draft": info.draft or None, "max_model_len": info.max_model_len,
                             "vocab_size": info.vocab_size, "max_batch_size": info.max_batch_size,
                             "default_max_new_tokens": info.default_max_new_tokens,
                             "default_speculation": {"mode": {1: "off", 2: "chain", 3: "tree"}.get(spec.mode),
                                                     "max_draft_tokens": spec.max_draft_tokens,
                                                     "tree_budget": spec.tree_budget}}}

    @app.get("/health")
    async def health():
        ok = await app.state.backend.serving()
        return JSONResponse({"status": "ok" if ok else "unavailable"}, status_code=200 if ok else 503)

    @app.get("/v1/models", dependencies=[Depends(authorize)])
    async def list_models():
        return {"object": "list", "data": [await model_card()]}

    @app.get("/v1/models/{model:path}", dependencies=[Depends(authorize)])
    async def get_model(model: str):
        await served_model(model)
        return await model_card()

    @app.post("/v1/completions", dependencies=[Depends(authorize)])
    async def completions(body: CompletionRequest, request: Request):
        body.check()
        shape = Shape(False, f"cmpl-{uuid.uuid4().hex}", await served_model(body.model), int(time.time()))
        return await generate(request, body, shape, body.prompt_input(), "prompt")

    @app.post("/v1/chat/completions", dependencies=[Depends(authorize)])
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        body.check()
        shape = Shape(True, f"chatcmpl-{uuid.uuid4().hex}", await served_model(body.model), int(time.time()))
        tokenizer = await call(app.state.backend.tokenizer())
        prompt = await asyncio.to_thread(render_chat, tokenizer, body.template_messages(), shape.model)
        return await generate(request, body, shape, prompt, "messages")

    async def generate(request: Request, body, shape: Shape, prompt, prompt_param: str):
        import grpc

        backend = app.state.backend
        msg = to_proto(body, shape.id, prompt=prompt)
        timeout = config.request_timeout
        if not body.stream:
            rpc = backend.stub.Generate(msg, timeout=timeout)
            watch = asyncio.create_task(cancel_on_disconnect(request, rpc))
            try:
                return shape.response(await call(rpc, prompt_param=prompt_param))
            finally:
                watch.cancel()
        rpc = backend.stub.GenerateStream(msg, timeout=timeout)
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
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        return StreamingResponse(stream_events(rpc, watch, first, shape, include_usage, prompt_param),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    return app


def validation_error(errors) -> ApiError:
    """pydantic's first complaint about a body, as OpenAI words it."""
    if not errors:
        return ApiError(400, "invalid request body")
    e = errors[0]
    param = "".join(f"[{x}]" if isinstance(x, int) else f".{x}" for x in e.get("loc", ())[1:]).lstrip(".") or None
    if e.get("type") == "extra_forbidden":
        return ApiError(400, f"Unrecognized request argument supplied: {param}", param=param,
                        code="unrecognized_argument")
    if e.get("type") == "json_invalid":
        return ApiError(400, f"the request body is not valid JSON: {e.get('msg')}", code="invalid_json")
    if e.get("type") == "missing" and param is None:
        return ApiError(400, "the request needs a JSON body", code="missing_body")
    return ApiError(400, f"{param or 'body'}: {e.get('msg')}", param=param, code=e.get("type"))


def render_chat(tokenizer, messages: list[dict], model: str) -> list[int]:
    """The prompt token ids of a chat, ending where the assistant's reply begins.

    The template is rendered to text and encoded without special tokens: templates write their own
    BOS, and ``encode``'s default would add a second one."""
    if not getattr(tokenizer, "chat_template", None):
        raise ApiError(400, f"the model {model!r} has no chat template (its tokenizer defines none): use "
                            f"/v1/completions with a prompt you format, or start the proxy with --chat-template FILE",
                       param="messages", code="no_chat_template")
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as exc:  # jinja2's TemplateError, or the template's own raise_exception()
        raise bad("messages", f"do not fit the model's chat template: {exc}", code="chat_template_error") from None
    return tokenizer.encode(text, add_special_tokens=False)


async def cancel_on_disconnect(request, rpc, every: float = 0.25) -> None:
    """Cancel the gRPC call when the HTTP client goes away (the server then frees the KV slot)."""
    while not rpc.done():
        if await request.is_disconnected():
            rpc.cancel()
            return
        await asyncio.sleep(every)


async def stream_events(rpc, watch, first, shape: Shape, include_usage: bool, prompt_param: str):
    """SSE lines of one streamed generation: a chunk per server message with text, a last chunk with
    finish_reason and the stats, then (``include_usage``) one with ``choices: []`` and the usage, then
    ``[DONE]``. A failure after the first message becomes an error event. However it ends (done,
    failed, client gone), the gRPC call is cancelled if still open."""
    import grpc

    def event(chunk: dict) -> str:
        return sse({**chunk, "usage": None} if include_usage else chunk)

    try:
        if shape.chat:
            yield event(shape.chunk(None, role=True))
        msg = first
        while msg is not grpc.aio.EOF:
            if msg.text:
                yield event(shape.chunk(msg.text))
            if (reason := FINISH.get(msg.finish_reason)) is not None:
                yield event({**shape.chunk(None, reason), "hedgerow": stats(msg.stats)})
                if include_usage:
                    yield sse({**shape.chunk(None), "choices": [], "usage": usage(msg.usage)})
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


# --- command line --------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("proxy")
    g.add_argument("--grpc", default="127.0.0.1:50051", metavar="HOST:PORT",
                   help="the `hedgerow serve` gRPC address (default: 127.0.0.1:50051)")
    g.add_argument("--host", default="127.0.0.1", help="HTTP address to listen on (default: 127.0.0.1)")
    g.add_argument("--port", type=int, default=8000, help="HTTP port; 0 = any free port (default: 8000)")
    g.add_argument("--api-key", default=os.environ.get("HEDGEROW_API_KEY"), metavar="KEY",
                   help="require 'Authorization: Bearer KEY' (default: $HEDGEROW_API_KEY; unset = no key)")
    g.add_argument("--tokenizer", default=None, metavar="PATH",
                   help="tokenizer for chat templates: HF id or folder (default: the model path the server reports)")
    g.add_argument("--chat-template", default=None, metavar="FILE",
                   help="a Jinja chat template replacing the tokenizer's")
    g.add_argument("--served-model-name", default=None, metavar="NAME",
                   help="the model id clients send and see (default: the server's --target)")
    g.add_argument("--request-timeout", type=float, default=600.0, metavar="SECONDS",
                   help="seconds a request may take before 504; 0 = no limit (default: 600)")
    g.add_argument("--drain-timeout", type=float, default=300.0, metavar="SECONDS",
                   help="seconds open requests get to finish after SIGTERM (default: 300)")


def config_from_args(args) -> ProxyConfig:
    host, sep, port = args.grpc.rpartition(":")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise HedgerowError(f"--grpc must be HOST:PORT with a port in [1, 65535], got {args.grpc!r}")
    if not 0 <= args.port <= 65535:
        raise HedgerowError(f"--port must be in [0, 65535], got {args.port}")
    if args.api_key is not None and not args.api_key.strip():
        raise HedgerowError("--api-key is empty")
    for flag in ("request_timeout", "drain_timeout"):
        if not getattr(args, flag) >= 0:
            raise HedgerowError(f"--{flag.replace('_', '-')} must be >= 0, got {getattr(args, flag)}")
    template = None
    if args.chat_template is not None:
        try:
            template = Path(args.chat_template).expanduser().read_text()
        except OSError as exc:
            raise HedgerowError(f"--chat-template {args.chat_template}: {exc.strerror or exc}") from None
    return ProxyConfig(grpc_target=args.grpc, api_key=args.api_key, tokenizer=args.tokenizer,
                       served_model_name=args.served_model_name, chat_template=template,
                       request_timeout=args.request_timeout or None)


def listen(host: str, port: int) -> socket.socket:
    """A listening socket (bound before uvicorn starts, so ``--port 0`` can report its port)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise HedgerowError(f"cannot listen on {host}:{port} (--host/--port): {exc.strerror or exc}") from None
    sock.listen(2048)
    return sock


def run(args) -> int:
    import uvicorn

    config = config_from_args(args)
    sock = listen(args.host, args.port)
    server = uvicorn.Server(uvicorn.Config(create_app(config), log_level="warning",
                                           timeout_graceful_shutdown=args.drain_timeout))
    port = sock.getsockname()[1]
    print(f"hedgerow: OpenAI API on http://{args.host}:{port}/v1, gRPC server {args.grpc}", flush=True)
    # uvicorn drains on SIGTERM, then raises the signal again for the handler it found: make that
    # handler a no-op, so that a drained proxy exits 0 (as `hedgerow serve` does)
    signal.signal(signal.SIGTERM, lambda *_: None)
    server.run(sockets=[sock])
    print("hedgerow: proxy stopped", file=sys.stderr, flush=True)
    return 0
