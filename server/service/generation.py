"""The ``hedgerow.v1.Generation`` servicer: a thin edge around the engine thread.

Per request: protobuf -> its n samples' ``Request``s (``requests``: validated, tokenized on a worker
thread) -> the engine thread (``hedgerow.server.engine.async_engine``, all samples in one command) ->
updates -> text per sample (detokenized on a worker thread, stop strings applied) -> the samples'
pieces merged as they come (``pieces``) -> protobuf, each message marked with its sample's index. Nothing here touches the engine itself, and nothing that
grows with a request's size runs on the event loop.

Status codes: bad input -> INVALID_ARGUMENT (also for what the engine refuses: a speculation mode
this server cannot run, a request_id already in flight; and bytes that do not parse, naming the
field); waiting queue full -> RESOURCE_EXHAUSTED; the server draining or its engine gone ->
UNAVAILABLE; a failure inside the engine for this request -> INTERNAL (other requests go on). No
message carries a Python class name, a path or a traceback: the server log has those. A client that
cancels, or whose deadline passes, has its sequence aborted and its KV slots freed at once.

Stop strings are the edge's business: the engine knows tokens, not text. When the text so far
contains a stop string, the text is cut just before it, the sequence is aborted (finish reason
STOP) and the response ends. Streamed text never includes a stop string: text that could still
turn out to begin one is held back until it cannot. ``token_ids`` report every committed token.

Shutdown (``grpc_service.GrpcServer.stop``): ``drain`` refuses new requests while those in flight
go on; ``close`` marks the engine's end as a shutdown, so the ABORT update each open request then
gets becomes its last message, FINISH_REASON_ABORT with the tokens so far. An ABORT update without
``close`` means the engine thread died: the request fails with UNAVAILABLE and ``engine_died`` is
called.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import Executor
from contextlib import aclosing

import grpc

from hedgerow.server.detokenize import IncrementalDetokenizer
from hedgerow.server.engine.async_engine import AsyncEngine
from hedgerow.server.engine.sequence import FinishReason
from hedgerow.server.errors import HedgerowError, OverloadedError
from hedgerow.server.rpc import generation_pb2 as pb
from hedgerow.server.rpc import generation_pb2_grpc as pb_grpc
from hedgerow.server.service.logprobs import logprob_messages
from hedgerow.server.service.pieces import (Collected, Piece, find_stop, finished_unread, merge, safe_end,
                                            stream_message)
from hedgerow.server.service.requests import MODE_NAMES, PROPOSER_NAMES, RequestConverter, ServiceConfig
from hedgerow.server.service.wire import Undecodable

log = logging.getLogger("hedgerow.grpc")


class RequestFailed(Exception):
    """The engine failed this request (INTERNAL)."""


class Unavailable(Exception):
    """The server cannot take or finish this request (UNAVAILABLE); ``refused``: it never reached
    the engine (counted as ``unavailable``; one that did is counted by how it ended)."""

    def __init__(self, message: str, refused: bool):
        super().__init__(message)
        self.refused = refused


class GenerationService(pb_grpc.GenerationServicer):
    def __init__(self, async_engine: AsyncEngine, tokenizer, config: ServiceConfig, pool: Executor,
                 engine_died=lambda: None):
        engine = async_engine.engine  # read here only for constants (frozen config, vocabulary)
        self.engine = async_engine
        self.tokenizer = tokenizer
        self.config = config
        self.pool = pool  # tokenizing and detokenizing
        self.metrics = async_engine.metrics
        self.engine_died = engine_died
        self.convert = RequestConverter(tokenizer, vocab_size=engine.target.vocab_size,
                                        max_model_len=engine.config.max_model_len,
                                        default_spec=engine.config.spec, config=config, pool=pool)
        spec = engine.config.spec.resolve(engine.draft is not None)
        self.info = pb.ModelInfoResponse(
            target=config.target_name, draft=config.draft_name, vocab_size=engine.target.vocab_size,
            max_model_len=engine.config.max_model_len, eos_token_ids=sorted(engine.eos_token_ids),
            default_speculation=pb.SpeculationParams(
                mode=MODE_NAMES[spec.mode], draft_tokens=spec.draft_tokens, tree_budget=spec.tree_budget,
                proposer=PROPOSER_NAMES[spec.proposer], ngram_max=spec.ngram_max, ngram_min=spec.ngram_min),
            max_batch_size=engine.config.max_batch_size,
            default_max_new_tokens=min(config.default_max_new_tokens, engine.config.max_model_len),
        )
        self.refusing: str | None = None  # why new requests are refused (draining, engine gone)
        self.closing = False  # the engine is being closed on purpose: an ABORT update is a shutdown
        self.active = 0  # requests whose handler is running
        self.idle = asyncio.Event()
        self.idle.set()

    # --- lifecycle (grpc_service.GrpcServer) -----------------------------------------------------
    def drain(self, why: str = "the server is shutting down") -> None:
        """Refuse new requests from now on; those in flight go on."""
        self.refusing = self.refusing or why

    def close(self) -> None:
        """The engine is about to be closed: its ABORT updates end requests as a shutdown."""
        self.drain()
        self.closing = True

    # --- RPCs ------------------------------------------------------------------------------------
    async def Generate(self, request, context) -> pb.GenerateResponse:
        collected, request_id = Collected(), ""
        self._enter()
        try:
            async with aclosing(self._generate(request, context)) as pieces:
                async for request_id, piece in pieces:
                    collected.add(piece)
        except Exception as exc:
            await self._abort(context, exc)
        finally:
            self._leave()
        return collected.response(request_id)

    async def GenerateStream(self, request, context):
        self._enter()
        try:
            async with aclosing(self._generate(request, context)) as pieces:
                async for request_id, piece in pieces:
                    yield stream_message(request_id, piece)
        except Exception as exc:
            await self._abort(context, exc)
        finally:
            self._leave()

    async def ModelInfo(self, request, context) -> pb.ModelInfoResponse:
        if isinstance(request, Undecodable):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.reason)
        return self.info

    # --- one request -----------------------------------------------------------------------------
    def _enter(self) -> None:
        self.active += 1
        self.idle.clear()

    def _leave(self) -> None:
        self.active -= 1
        if self.active == 0:
            self.idle.set()

    async def _abort(self, context, exc: Exception) -> None:
        """Map an exception to a status code and a message for the client (the one place that
        does), count refusals, and end the RPC."""
        if isinstance(exc, OverloadedError):
            self.metrics.record_rejected("resource_exhausted")
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        if isinstance(exc, HedgerowError):
            self.metrics.record_rejected("invalid_argument")
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        if isinstance(exc, Unavailable):
            if exc.refused:
                self.metrics.record_rejected("unavailable")
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        if isinstance(exc, RequestFailed):
            await context.abort(grpc.StatusCode.INTERNAL, str(exc))
        log.error("unexpected error", exc_info=exc)
        await context.abort(grpc.StatusCode.INTERNAL, "internal error: the server log has the details")

    def _check_open(self) -> None:
        if self.refusing is not None:
            raise Unavailable(f"{self.refusing}: retry on another server or later", refused=True)

    async def _text(self, detok: IncrementalDetokenizer, token_ids: tuple[int, ...], final: bool) -> str:
        """The whole text so far once ``token_ids`` are added, decoded on a worker thread."""
        def decode() -> str:
            detok.push(list(token_ids))
            if final:
                detok.flush()
            return detok.emitted

        return await asyncio.get_running_loop().run_in_executor(self.pool, decode)

    async def _generate(self, msg, context):
        """The request's ``(request_id, piece)`` pairs, one piece per engine step of each sample;
        raises HedgerowError (refused), Unavailable or RequestFailed (the first failure of any
        sample ends the request). The samples are submitted together, so they share the prompt's
        prefill (``hedgerow.server.engine.samples``)."""
        arrived = time.perf_counter()
        if isinstance(msg, Undecodable):
            raise HedgerowError(msg.reason)
        self._check_open()
        requests, stops = await self.convert(msg)
        self._check_open()  # the server may have begun draining while the prompt was tokenized
        try:
            streams = self.engine.submit_group(requests)
        except RuntimeError:  # the engine thread is gone
            self.engine_died()
            raise Unavailable("the server's engine stopped; the server is restarting", refused=True) from None
        context.add_done_callback(lambda _: [stream.cancel() for stream in streams])
        try:
            async with aclosing(merge([self._sample(s, stops, arrived) for s in streams])) as pieces:
                async for piece in pieces:
                    yield requests[0].request_id, piece
        finally:
            for stream in streams:  # also those whose pieces were never read
                stream.cancel()

    async def _sample(self, stream, stops: tuple[str, ...], arrived: float):
        """One submitted sample's pieces. However it ends (done, failed, client gone, another sample
        failed), its sequence is aborted and ``requests_total`` counts how it ended (each sample
        once; a refusal is counted by ``_abort``)."""
        outcome = "cancelled"  # what requests_total{status} records, until it ends otherwise; None: nothing
        try:
            async with aclosing(self._pieces(stream, stops, arrived)) as pieces:
                async for piece in pieces:
                    if piece.finish_reason is not None:  # recorded before the client can see the end
                        outcome = None
                        self.metrics.record_request(piece.finish_reason.value, time.perf_counter() - arrived)
                    yield piece
        except HedgerowError:  # refused by the engine at submission
            outcome = None
            raise
        except Unavailable as exc:
            outcome = None if exc.refused else "error"
            raise
        except Exception:
            outcome = "error"
            raise
        finally:
            stream.cancel()
            if outcome == "cancelled":  # ended early: by the client, or after the engine had finished?
                outcome = finished_unread(stream, outcome)
            if outcome is not None:
                self.metrics.record_request(outcome, time.perf_counter() - arrived)

    async def _pieces(self, stream, stops: tuple[str, ...], arrived: float):
        """A submitted request's pieces, until one carries the finish reason."""
        detok = IncrementalDetokenizer(self.tokenizer)
        longest = max(map(len, stops), default=0)
        sent = 0  # characters of text already handed out
        last_tokens = None  # time the previous tokens arrived
        async for update in stream:
            if update.error is not None:
                log.error("request %s failed in the engine: %s", update.request_id, update.error)
                raise RequestFailed(f"request {update.request_id} failed in the engine; the server log has the reason")
            if update.finish_reason is FinishReason.ABORT and not self.closing:
                self.engine_died()
                raise Unavailable("the server's engine stopped; the server is restarting", refused=False)
            now = time.perf_counter()
            if update.token_ids:
                if last_tokens is None:
                    self.metrics.record_first_token(now - arrived)
                else:
                    self.metrics.record_tokens(len(update.token_ids), now - last_tokens)
                last_tokens = now
            before = len(detok.emitted)
            reason = update.finish_reason
            text = await self._text(detok, update.token_ids, final=reason is not None)
            cut = find_stop(text, stops, max(0, before - longest + 1)) if stops else None
            if cut is not None:
                text, reason = text[:cut], FinishReason.STOP
                stream.cancel(FinishReason.STOP)
            end = len(text) if reason is not None else max(sent, safe_end(text, stops, longest))
            logprobs = await asyncio.get_running_loop().run_in_executor(
                self.pool, logprob_messages, self.tokenizer, update.logprobs) if update.logprobs else []
            yield Piece(update, text[sent:end], reason, logprobs)
            sent = end
            if reason is not None:
                return
