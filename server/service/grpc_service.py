"""The ``hedgerow.v1.Generation`` gRPC service (grpc.aio): a thin edge around the engine thread.

Per request: protobuf -> ``Request`` (validated here, every refusal naming its field) -> the
engine thread (``hedgerow.server.engine.async_engine``) -> updates -> text (detokenized incrementally, stop
strings applied) -> protobuf. Nothing here touches the engine itself.

Status codes: bad input -> INVALID_ARGUMENT (also for what the engine refuses: a speculation mode
this server cannot run, a request_id already in flight); waiting queue full -> RESOURCE_EXHAUSTED;
a failure inside the engine for this request -> INTERNAL (other requests go on). A client that
cancels, or whose deadline passes, has its sequence aborted and its KV slots freed at once.

Stop strings are the edge's business: the engine knows tokens, not text. When the text so far
contains a stop string, the text is cut just before it, the sequence is aborted (finish reason
STOP) and the response ends. Streamed text never includes a stop string: text that could still
turn out to begin one is held back until it cannot. ``token_ids`` report every committed token.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from contextlib import aclosing
from dataclasses import dataclass, replace

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from hedgerow.server.engine.async_engine import AsyncEngine, Update
from hedgerow.server.detokenize import IncrementalDetokenizer
from hedgerow.server.engine.engine import Engine
from hedgerow.server.errors import HedgerowError, OverloadedError
from hedgerow.server.service.metrics import Metrics
from hedgerow.server.rpc import generation_pb2 as pb
from hedgerow.server.rpc import generation_pb2_grpc as pb_grpc
from hedgerow.server.engine.sequence import FinishReason, Request, SpecMode, SpecParams
from hedgerow.verify.sampling import SamplingParams

log = logging.getLogger("hedgerow.grpc")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Generation"].full_name  # "hedgerow.v1.Generation"

MODES = {
    pb.SPECULATION_MODE_PLAIN: SpecMode.PLAIN,
    pb.SPECULATION_MODE_CHAIN: SpecMode.CHAIN,
    pb.SPECULATION_MODE_TREE: SpecMode.TREE,
}
MODE_NAMES = {v: k for k, v in MODES.items()}
FINISH = {
    FinishReason.EOS: pb.FINISH_REASON_EOS,
    FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
    FinishReason.STOP: pb.FINISH_REASON_STOP,
    FinishReason.ABORT: pb.FINISH_REASON_ABORT,
}


@dataclass(frozen=True)
class ServiceConfig:
    """What the edge allows and reports; the engine's own limits come from its EngineConfig."""

    target_name: str = ""
    draft_name: str = ""
    default_max_new_tokens: int = 128  # capped at max_model_len
    max_stop_strings: int = 16
    max_stop_chars: int = 256  # per stop string
    draft_tokens_limit: int = 64  # the most draft_tokens a request may ask for
    tree_budget_limit: int = 1024  # the most tree_budget a request may ask for
    max_request_id_chars: int = 256

    def __post_init__(self) -> None:
        for name in ("default_max_new_tokens", "max_stop_chars", "max_request_id_chars"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


class RequestFailed(Exception):
    """The engine failed this request (INTERNAL)."""


# --- protobuf -> dataclasses ---------------------------------------------------------------------
class RequestConverter:
    """Turns a ``GenerateRequest`` into a ``Request`` and its stop strings, or raises
    HedgerowError whose message starts with the offending field."""

    def __init__(self, tokenizer, *, vocab_size: int, max_model_len: int, default_spec: SpecParams,
                 config: ServiceConfig):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len
        self.default_spec = default_spec
        self.config = config

    def __call__(self, msg: pb.GenerateRequest) -> tuple[Request, tuple[str, ...]]:
        cfg = self.config
        rid = msg.request_id or uuid.uuid4().hex
        if len(rid) > cfg.max_request_id_chars:
            raise HedgerowError(f"request_id is {len(rid)} characters; at most {cfg.max_request_id_chars}")
        prompt_ids = self._prompt(msg)
        sampling = self._sampling(msg.sampling)
        stopping = msg.stopping
        max_new = stopping.max_new_tokens if stopping.HasField("max_new_tokens") else min(
            cfg.default_max_new_tokens, self.max_model_len)
        if not 1 <= max_new <= self.max_model_len:
            raise HedgerowError(f"stopping.max_new_tokens must be in [1, {self.max_model_len}] "
                                f"(max_model_len), got {max_new}")
        stops = tuple(stopping.stop)
        if len(stops) > cfg.max_stop_strings:
            raise HedgerowError(f"stopping.stop has {len(stops)} strings; at most {cfg.max_stop_strings}")
        for i, s in enumerate(stops):
            if not s:
                raise HedgerowError(f"stopping.stop[{i}] is empty")
            if len(s) > cfg.max_stop_chars:
                raise HedgerowError(f"stopping.stop[{i}] is {len(s)} characters; at most {cfg.max_stop_chars}")
        spec = self._spec(msg.speculation) if msg.HasField("speculation") else None
        return Request(rid, prompt_ids, sampling, max_new, spec, ignore_eos=stopping.ignore_eos), stops

    def _prompt(self, msg: pb.GenerateRequest) -> tuple[int, ...]:
        has_text, has_ids = msg.HasField("prompt"), len(msg.prompt_token_ids) > 0
        if has_text and has_ids:
            raise HedgerowError("prompt and prompt_token_ids are both set; set exactly one")
        if not has_text and not has_ids:
            raise HedgerowError("prompt is missing: set prompt or prompt_token_ids")
        if has_text:
            if not msg.prompt:
                raise HedgerowError("prompt is empty")
            ids, field = tuple(self.tokenizer.encode(msg.prompt)), "prompt"
        else:
            ids, field = tuple(msg.prompt_token_ids), "prompt_token_ids"
            for i, t in enumerate(ids):
                if t >= self.vocab_size:
                    raise HedgerowError(f"prompt_token_ids[{i}] = {t} is outside the vocabulary [0, {self.vocab_size})")
        if not ids:
            raise HedgerowError(f"{field} is empty after tokenization")
        if len(ids) >= self.max_model_len:
            raise HedgerowError(f"{field} is {len(ids)} tokens; the context (max_model_len {self.max_model_len}) "
                                f"holds at most {self.max_model_len - 1} prompt tokens")
        return ids

    @staticmethod
    def _sampling(s: pb.SamplingParams) -> SamplingParams:
        temperature = s.temperature if s.HasField("temperature") else 0.0
        top_k = s.top_k if s.HasField("top_k") else 0
        top_p = s.top_p if s.HasField("top_p") else 1.0
        seed = s.seed if s.HasField("seed") else None
        if not math.isfinite(temperature) or temperature < 0:
            raise HedgerowError(f"sampling.temperature must be a finite number >= 0 (0 = greedy), got {temperature}")
        if top_k < 0:
            raise HedgerowError(f"sampling.top_k must be >= 0 (0 = off), got {top_k}")
        if not 0.0 < top_p <= 1.0:  # NaN fails this too
            raise HedgerowError(f"sampling.top_p must be in (0, 1], got {top_p}")
        if seed is not None and seed < 0:
            raise HedgerowError(f"sampling.seed must be >= 0, got {seed}")
        return SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)

    def _spec(self, s: pb.SpeculationParams) -> SpecParams:
        cfg, base = self.config, self.default_spec
        if s.mode == pb.SPECULATION_MODE_UNSPECIFIED:
            mode = base.mode
        elif s.mode in MODES:
            mode = MODES[s.mode]
        else:
            raise HedgerowError(f"speculation.mode {s.mode} is not a SpeculationMode "
                                f"(one of {', '.join(pb.SpeculationMode.keys())})")
        draft_tokens = s.draft_tokens if s.HasField("draft_tokens") else base.draft_tokens
        if not 0 <= draft_tokens <= cfg.draft_tokens_limit:
            raise HedgerowError(
                f"speculation.draft_tokens must be in [0, {cfg.draft_tokens_limit}], got {draft_tokens}")
        budget = s.tree_budget if s.HasField("tree_budget") else base.tree_budget
        if not 0 <= budget <= cfg.tree_budget_limit:
            raise HedgerowError(f"speculation.tree_budget must be in [0, {cfg.tree_budget_limit}], got {budget}")
        return replace(base, mode=mode, draft_tokens=draft_tokens, tree_budget=budget)  # the rest: defaults


# --- the servicer --------------------------------------------------------------------------------
@dataclass
class _Piece:
    """One message's worth: a step's tokens, the text they complete, and the end if it is one."""

    update: Update
    text: str
    finish_reason: FinishReason | None


class GenerationService(pb_grpc.GenerationServicer):
    def __init__(self, async_engine: AsyncEngine, tokenizer, config: ServiceConfig = ServiceConfig()):
        engine = async_engine.engine  # read here only for constants (frozen config, vocabulary)
        self.engine = async_engine
        self.tokenizer = tokenizer
        self.config = config
        self.metrics = async_engine.metrics
        self.convert = RequestConverter(tokenizer, vocab_size=engine.target.vocab_size,
                                        max_model_len=engine.config.max_model_len,
                                        default_spec=engine.config.spec, config=config)
        self.info = pb.ModelInfoResponse(
            target=config.target_name, draft=config.draft_name, vocab_size=engine.target.vocab_size,
            max_model_len=engine.config.max_model_len, eos_token_ids=sorted(engine.eos_token_ids),
            default_speculation=pb.SpeculationParams(
                mode=MODE_NAMES[engine.config.spec.mode], draft_tokens=engine.config.spec.draft_tokens,
                tree_budget=engine.config.spec.tree_budget),
            max_batch_size=engine.config.max_batch_size,
            default_max_new_tokens=min(config.default_max_new_tokens, engine.config.max_model_len),
        )

    async def Generate(self, request: pb.GenerateRequest, context) -> pb.GenerateResponse:
        text, ids, last = [], [], None
        try:
            async with aclosing(self._generate(request, context)) as pieces:
                async for piece in pieces:
                    text.append(piece.text)
                    ids.extend(piece.update.token_ids)
                    last = piece
        except Exception as exc:
            await self._abort(context, exc)
        return pb.GenerateResponse(request_id=last.update.request_id, text="".join(text), token_ids=ids,
                                   finish_reason=FINISH[last.finish_reason], usage=_usage(last.update),
                                   stats=_stats(last.update))

    async def GenerateStream(self, request: pb.GenerateRequest, context):
        try:
            async with aclosing(self._generate(request, context)) as pieces:
                async for piece in pieces:
                    msg = pb.GenerateStreamResponse(request_id=piece.update.request_id, text=piece.text,
                                                    token_ids=piece.update.token_ids)
                    if piece.finish_reason is not None:
                        msg.finish_reason = FINISH[piece.finish_reason]
                        msg.usage.CopyFrom(_usage(piece.update))
                        msg.stats.CopyFrom(_stats(piece.update))
                    yield msg
        except Exception as exc:
            await self._abort(context, exc)

    async def ModelInfo(self, request: pb.ModelInfoRequest, context) -> pb.ModelInfoResponse:
        return self.info

    async def _abort(self, context, exc: Exception) -> None:
        """Map an exception to a status code (the one place that does) and end the RPC."""
        if isinstance(exc, OverloadedError):
            self.metrics.record_rejected("resource_exhausted")
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        if isinstance(exc, HedgerowError):
            self.metrics.record_rejected("invalid_argument")
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        if isinstance(exc, RequestFailed):
            await context.abort(grpc.StatusCode.INTERNAL, f"request failed: {exc}")
        log.exception("unexpected error", exc_info=exc)
        await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}")

    async def _generate(self, msg: pb.GenerateRequest, context):
        """The request's pieces, one per engine step; raises HedgerowError (refused) or
        RequestFailed. However the RPC ends (client gone, deadline), the sequence is aborted."""
        arrived = time.perf_counter()
        request, stops = self.convert(msg)
        stream = self.engine.submit(request)
        context.add_done_callback(lambda _: stream.cancel())
        detok = IncrementalDetokenizer(self.tokenizer)
        longest = max(map(len, stops), default=0)
        sent = 0  # characters of text already handed out
        last_tokens = None  # time the previous tokens arrived
        outcome = "cancelled"  # what requests_total{status} records if this ends early
        try:
            async for update in stream:
                if update.error is not None:
                    outcome = "error"
                    raise RequestFailed(update.error)
                now = time.perf_counter()
                if update.token_ids:
                    if last_tokens is None:
                        self.metrics.record_first_token(now - arrived)
                    else:
                        self.metrics.record_tokens(len(update.token_ids), now - last_tokens)
                    last_tokens = now
                before = len(detok.emitted)
                detok.push(list(update.token_ids))
                reason = update.finish_reason
                if reason is not None:
                    detok.flush()
                text = detok.emitted  # the whole text so far
                cut = _find_stop(text, stops, max(0, before - longest + 1)) if stops else None
                if cut is not None:
                    text, reason = text[:cut], FinishReason.STOP
                    stream.cancel(FinishReason.STOP)
                end = len(text) if reason is not None else max(sent, _safe_end(text, stops, longest))
                if reason is not None:  # recorded before the client can see the end
                    self.metrics.record_request(reason.value, time.perf_counter() - arrived)
                    outcome = None
                yield _Piece(update, text[sent:end], reason)
                sent = end
                if reason is not None:
                    return
        except HedgerowError:  # refused at submission (counted as rejected by the caller)
            outcome = None
            raise
        finally:
            stream.cancel()
            if outcome is not None:
                self.metrics.record_request(outcome, time.perf_counter() - arrived)


def _find_stop(text: str, stops: tuple[str, ...], start: int) -> int | None:
    """Index of the earliest stop string in ``text[start:]``, if any."""
    hits = [i for i in (text.find(s, start) for s in stops) if i >= 0]
    return min(hits) if hits else None


def _safe_end(text: str, stops: tuple[str, ...], longest: int) -> int:
    """How much of ``text`` can be sent: all but a tail that may be the start of a stop string."""
    for i in range(max(0, len(text) - longest + 1), len(text)):
        tail = text[i:]
        if any(s.startswith(tail) for s in stops):
            return i
    return len(text)


def _usage(u: Update) -> pb.Usage:
    return pb.Usage(prompt_tokens=u.prompt_tokens, completion_tokens=u.completion_tokens)


def _stats(u: Update) -> pb.Stats:
    return pb.Stats(verify_steps=u.verify_steps, draft_tokens=u.draft_tokens, accepted_tokens=u.accepted_tokens)


# --- the server ----------------------------------------------------------------------------------
@dataclass
class GrpcServer:
    server: grpc.aio.Server
    port: int
    engine: AsyncEngine
    health: health.aio.HealthServicer

    async def stop(self, grace: float | None) -> None:
        """Stop accepting requests, let those in flight finish for up to ``grace`` seconds (None:
        end them now), then stop the engine thread."""
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)
        await asyncio.to_thread(self.engine.close)


async def start_server(engine: Engine, tokenizer, *, host: str = "127.0.0.1", port: int = 0,
                       config: ServiceConfig = ServiceConfig(), metrics: Metrics | None = None) -> GrpcServer:
    """Start the engine thread and a grpc.aio server with the Generation, health and reflection
    services; ``port`` 0 picks a free port (see ``.port``)."""
    async_engine = AsyncEngine(engine, metrics if metrics is not None else Metrics())
    server = grpc.aio.server()
    pb_grpc.add_GenerationServicer_to_server(GenerationService(async_engine, tokenizer, config), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server)
    try:
        bound = server.add_insecure_port(f"{host}:{port}")
    except RuntimeError:  # grpc logs why (address in use, no such address)
        bound = 0
    if bound == 0:
        raise HedgerowError(f"cannot listen on {host}:{port} (--host/--port)")
    async_engine.start()
    await server.start()
    return GrpcServer(server, bound, async_engine, health_servicer)
