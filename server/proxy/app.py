"""The proxy's FastAPI app: the routes, and OpenAI's error JSON for every refusal.

``GET /health`` needs no key; everything else (``GET /v1/models[/{model}]``, ``POST /v1/completions``,
``POST /v1/chat/completions``) needs ``Authorization: Bearer KEY`` when the proxy has one, checked by
``guard`` before any body is read; with a key, FastAPI's ``/docs``, ``/redoc`` and ``/openapi.json``
are not served. The routes are the methods of ``Proxy``, which holds what they share (the config,
and the gRPC backend the app's lifespan opens); the wire format is ``convert``'s, streaming
``streaming``'s, and every gRPC failure arrives here already an ``ApiError`` (``backend``). Anything
else that fails is a 500 in OpenAI's JSON with no detail (the log has the traceback): no input gets
a bare 500.
"""

# FastAPI reads the endpoints' annotations at run time, so the classes they name are imported at the
# top; the command line imports this module only when the proxy runs (fastapi is slow to import).
import asyncio
import logging
import time
import uuid
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from hedgerow.server.proxy.backend import Backend, call, call_all, cancel_on_disconnect
from hedgerow.server.proxy.config import ProxyConfig
from hedgerow.server.proxy.convert import Shape, model_card, render_chat, to_proto
from hedgerow.server.proxy.guard import Guard, error_response
from hedgerow.server.proxy.chat import ChatCompletionRequest
from hedgerow.server.proxy.schema import ApiError, CompletionRequest
from hedgerow.server.proxy.streaming import stream_response

log = logging.getLogger("hedgerow.proxy")


class Proxy:
    """The routes of one app, and what they share: its config and its gRPC backend."""

    def __init__(self, config: ProxyConfig, backend=Backend):
        self.config = config
        # ``backend(config)`` opens the backend: the gRPC one, or one with its methods that calls the
        # service in process (a Ray Serve replica, hedgerow.server.scaleout.calls.LocalBackend)
        self.make_backend = backend
        self.backend: Backend | None = None  # open while the app runs

    @asynccontextmanager
    async def lifespan(self, app: FastAPI):
        self.backend = self.make_backend(self.config)  # on the event loop that serves requests
        warm = asyncio.create_task(self.backend.warm())
        try:
            yield
        finally:
            warm.cancel()
            await self.backend.close()

    async def served_model(self, requested: str | None = None) -> str:
        model = await call(self.backend.model_id())
        if requested is not None and requested != model:
            raise ApiError(404, f"The model {requested!r} does not exist: this server serves {model!r}",
                           param="model", code="model_not_found")
        return model

    async def card(self) -> dict:
        info = await call(self.backend.info())
        return model_card(info, await self.served_model(), self.backend.created)

    # --- routes ----------------------------------------------------------------------------------
    async def health(self):
        ok = await self.backend.serving()
        return JSONResponse({"status": "ok" if ok else "unavailable"}, status_code=200 if ok else 503)

    async def list_models(self):
        return {"object": "list", "data": [await self.card()]}

    async def get_model(self, model: str):
        await self.served_model(model)
        return await self.card()

    async def completions(self, body: CompletionRequest, request: Request):
        body.check()
        shape = Shape(False, f"cmpl-{uuid.uuid4().hex}", await self.served_model(body.model), int(time.time()),
                      body.top_logprobs_asked() is not None)
        return await self.generate(request, body, shape, body.prompts(), "prompt")

    async def chat_completions(self, body: ChatCompletionRequest, request: Request):
        body.check()
        shape = Shape(True, f"chatcmpl-{uuid.uuid4().hex}", await self.served_model(body.model), int(time.time()),
                      body.top_logprobs_asked() is not None)
        tokenizer = await call(self.backend.tokenizer())
        prompt = await asyncio.to_thread(render_chat, tokenizer, body.template_messages(), shape.model)
        return await self.generate(request, body, shape, [prompt], "messages")

    async def generate(self, request: Request, body, shape: Shape, prompts: list, prompt_param: str):
        """One gRPC call per prompt (``Generate``, or ``GenerateStream`` when streaming), each for n
        samples; the calls of a batch are all sent before any answer is read, so the server takes
        them together, and the first failure fails the request."""
        ids = [shape.id] if len(prompts) == 1 else [f"{shape.id}-{p}" for p in range(len(prompts))]
        rpcs = [await self.backend.generate(to_proto(body, rid, prompt=prompt), stream=body.stream,
                                            timeout=self.config.request_timeout) for rid, prompt in zip(ids, prompts)]
        if body.stream:
            include_usage = body.stream_options is not None and body.stream_options.include_usage
            steps = body.hedgerow is not None and body.hedgerow.step_stats
            return await stream_response(request, rpcs, shape, include_usage, prompt_param, steps, body.samples())
        watch = asyncio.create_task(cancel_on_disconnect(request, rpcs))
        try:
            return shape.response(await call_all(rpcs, prompt_param=prompt_param))
        finally:
            watch.cancel()


def create_app(config: ProxyConfig, backend=Backend) -> FastAPI:
    proxy = Proxy(config, backend)
    docs = {} if config.api_key is None else {"docs_url": None, "redoc_url": None, "openapi_url": None}
    app = FastAPI(title="Hedgerow OpenAI-compatible proxy", lifespan=proxy.lifespan, **docs)
    app.add_middleware(Guard, api_key=config.api_key, max_body_bytes=config.max_body_bytes)
    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(RequestValidationError, invalid_body)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(Exception, internal_error)
    app.add_api_route("/health", proxy.health, methods=["GET"])
    app.add_api_route("/v1/models", proxy.list_models, methods=["GET"])
    app.add_api_route("/v1/models/{model:path}", proxy.get_model, methods=["GET"])
    app.add_api_route("/v1/completions", proxy.completions, methods=["POST"])
    app.add_api_route("/v1/chat/completions", proxy.chat_completions, methods=["POST"])
    return app


# --- errors, as OpenAI's JSON --------------------------------------------------------------------
async def api_error(request: Request, exc: ApiError):
    return error_response(exc)


async def internal_error(request: Request, exc: Exception):
    """The last resort: a bug of the proxy is a 500 in OpenAI's JSON, its traceback in the log only."""
    log.error("unexpected error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(ApiError(500, "internal error in the proxy: its log has the details", type="server_error",
                                   code="internal_error"))


async def invalid_body(request: Request, exc: RequestValidationError):
    return error_response(validation_error(exc.errors()))


async def http_error(request: Request, exc: HTTPException):
    return error_response(ApiError(exc.status_code, str(exc.detail), code=str(exc.status_code)))


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
