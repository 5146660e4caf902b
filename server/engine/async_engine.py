"""The engine in its own thread, fed by asyncio handlers.

``server.engine.Engine`` is not thread-safe, so exactly one thread, the engine thread, ever calls
it. Everything else talks to that thread through one thread-safe command queue:

    handler (event loop)                      engine thread
    submit(request) -> RequestStream ──add──▶ engine.add_request   (refusal goes back on the stream)
    submit_group(requests)           ──add──▶ engine.add_request each, all or none
    stream.cancel()                  ──abort▶ engine.abort          (frees the KV slots)
                                              engine.step() ──▶ Update per request, to its stream
    async for update in stream      ◀──────── loop.call_soon_threadsafe(queue.put_nowait, ...)

Between two steps the thread drains every queued command, so requests join and leave the batch
between steps (continuous batching). With nothing to do it blocks on the queue: no busy loop.
Updates are snapshots (tuples, ints), never the live ``Sequence``, which only the engine thread reads.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Mapping, Protocol

from hedgerow.server.engine.commit import StepOutput
from hedgerow.server.engine.engine import Engine
from hedgerow.server.errors import HedgerowError
from hedgerow.server.engine.sequence import FinishReason, ProposerCounts, Request, Sequence, SpecMode

log = logging.getLogger("hedgerow.async_engine")


class EngineMetrics(Protocol):
    """What the engine thread reports (the server's Prometheus metrics implement it)."""

    def record_prompt(self, tokens: int) -> None: ...
    def record_queue(self, seconds: float) -> None: ...
    def record_phases(self, phases: dict[str, float]) -> None: ...
    def record_step(self, *, emitted: int, draft_tokens: int, accepted_tokens: int, speculative: bool,
                    proposers: Mapping[str, ProposerCounts], branches: int, branch_hit: bool) -> None: ...
    def set_load(self, *, running: int, waiting: int, kv_slots: dict[str, int]) -> None: ...


class NoMetrics:
    """Reports nowhere (tools and tests that run the engine thread without a server)."""

    def record_prompt(self, tokens): pass
    def record_queue(self, seconds): pass
    def record_phases(self, phases): pass
    def record_step(self, **counts): pass
    def set_load(self, **load): pass


@dataclass(frozen=True)
class StepStats:
    """What one step drafted and accepted for one request, and the budget its policy chose."""

    draft_tokens: int
    accepted_tokens: int
    proposers: tuple[tuple[str, ProposerCounts], ...]  # by proposer that drafted
    draft_budget: int  # the draft model's tokens (chain) or nodes (tree) allowed
    ngram_budget: int  # n-gram nodes allowed


@dataclass(frozen=True)
class Update:
    """What one engine step did for one request, copied out of the engine thread."""

    request_id: str
    token_ids: tuple[int, ...]  # committed by this step
    finish_reason: FinishReason | None  # set on the request's last update
    prompt_tokens: int
    completion_tokens: int  # committed so far, this step included
    verify_steps: int  # cumulative, like the two below
    draft_tokens: int
    accepted_tokens: int
    error: str | None = None  # the request failed inside the engine (this request only)
    # cumulative draft and accepted tokens by proposer ("model", "ngram"), for each that drafted
    proposers: tuple[tuple[str, ProposerCounts], ...] = ()
    step: StepStats | None = None  # this update's step; None for an end no step produced (ABORT, ERROR)
    logprobs: tuple = ()  # per token of token_ids, the target's TokenLogprob, when the request asks


class RequestStream:
    """One request's updates, read on the event loop that submitted it."""

    def __init__(self, owner: AsyncEngine, request: Request, loop: asyncio.AbstractEventLoop):
        self.owner = owner
        self.request = request
        self.loop = loop
        self.queue: asyncio.Queue[Update | BaseException] = asyncio.Queue()
        self.arrived = time.perf_counter()
        self.sequence = None  # engine thread only: the engine's Sequence once accepted
        self.admitted = False  # engine thread only: has it joined the batch yet?
        self.done = False  # event loop only: has the last update been read?

    @property
    def request_id(self) -> str:
        return self.request.request_id

    def __aiter__(self):
        return self

    async def __anext__(self) -> Update:
        if self.done:
            raise StopAsyncIteration
        item = await self.queue.get()
        if isinstance(item, BaseException):  # refused at submission
            self.done = True
            raise item
        if item.finish_reason is not None:
            self.done = True
        return item

    def cancel(self, reason: FinishReason = FinishReason.ABORT) -> None:
        """End the request if it is still going (idempotent; call it on the event loop); its slots
        are freed before the engine's next step."""
        if not self.done:
            self.done = True
            self.owner._commands.put(("abort", self, reason))

    def _deliver(self, item: Update | BaseException) -> None:  # engine thread
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass


class AsyncEngine:
    def __init__(self, engine: Engine, metrics: EngineMetrics | None = None):
        self.engine = engine
        self.metrics = metrics if metrics is not None else NoMetrics()
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, RequestStream] = {}  # engine thread only
        self._thread = threading.Thread(target=self._run, name="hedgerow-engine", daemon=True)

    # --- event-loop side -------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def submit(self, request: Request) -> RequestStream:
        """Queue a request; iterate the stream for its updates. A refusal (HedgerowError, or
        OverloadedError when the waiting queue is full) is raised by the first ``__anext__``."""
        return self.submit_group([request])[0]

    def submit_group(self, requests: list[Request]) -> list[RequestStream]:
        """Queue requests together, in one command: they reach the engine between the same two
        steps, in order (so the samples of one prompt are admitted together and share its
        prefill), and all or none are taken: if the engine refuses one, every stream raises."""
        if not self._thread.is_alive():
            raise RuntimeError("the engine thread is not running")
        loop = asyncio.get_running_loop()
        streams = [RequestStream(self, request, loop) for request in requests]
        self._commands.put(("add", streams, None))
        return streams

    def close(self, timeout: float | None = None) -> None:
        """Stop the engine thread; requests still in flight end with ABORT. Call it after the RPC
        server has drained."""
        if self._thread.is_alive():
            self._commands.put(("close", None, None))
            self._thread.join(timeout)

    def call(self, fn, timeout: float = 30.0):
        """Run ``fn(engine)`` on the engine thread and return its result (for inspection in tests
        and tools: the engine must not be read from another thread while it steps)."""
        done = threading.Event()
        box: list = []
        self._commands.put(("call", (fn, box, done), None))
        if not done.wait(timeout):
            raise TimeoutError("the engine thread did not answer")
        if isinstance(box[0], BaseException):
            raise box[0]
        return box[0]

    # --- engine thread ---------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while True:
                if not self._drain(block=not self.engine.has_work()):
                    break
                if self.engine.has_work():
                    self._step()
        except BaseException:
            log.exception("the engine thread stopped")
            raise
        finally:
            for stream in list(self._streams.values()):
                self.engine.abort(stream.request_id)
                self._finish(stream, FinishReason.ABORT)
            self._set_load()

    def _drain(self, block: bool) -> bool:
        """Apply queued commands (waiting for one if ``block``); False once asked to close."""
        while True:
            try:
                kind, payload, arg = self._commands.get(block=block)
            except queue.Empty:
                return True
            block = False
            if kind == "close":
                return False
            if kind == "add":
                self._add(payload)
            elif kind == "abort" and self._streams.get(payload.request_id) is payload:
                self.engine.abort(payload.request_id, arg)
                del self._streams[payload.request_id]
            elif kind == "call":
                fn, box, done = payload
                try:
                    box.append(fn(self.engine))
                except BaseException as exc:  # handed to the caller
                    box.append(exc)
                done.set()
            self._set_load()

    def _add(self, streams: list[RequestStream]) -> None:
        added = []
        try:
            for stream in streams:
                rid = stream.request_id
                if rid in self._streams or any(s.request_id == rid for s in added):
                    raise HedgerowError(f"request_id {rid!r} is already in flight")
                stream.sequence = self.engine.add_request(stream.request)
                added.append(stream)
        except Exception as exc:  # HedgerowError: refused; anything else: a bug, these requests' only
            if not isinstance(exc, HedgerowError):
                log.exception("add_request failed for %s", streams[len(added)].request_id)
            for stream in added:  # all or none
                self.engine.abort(stream.request_id)
            for stream in streams:
                stream._deliver(exc)
            return
        for stream in streams:
            self._streams[stream.request_id] = stream
            self.metrics.record_prompt(len(stream.request.prompt_ids))

    def _step(self) -> None:
        started = time.perf_counter()
        try:
            result = self.engine.step()
        except Exception as exc:  # the engine fails requests itself; this is a bug: fail the batch, go on
            log.exception("engine step failed")
            for stream in list(self._streams.values()):
                self.engine.abort(stream.request_id, FinishReason.ERROR)
                self._finish(stream, FinishReason.ERROR, error=f"{type(exc).__name__}: {exc}")
            self._set_load()
            return
        if result.phases is not None:
            self.metrics.record_phases(result.phases)
        updates = []
        for out in result.outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue
            if not stream.admitted:
                stream.admitted = True
                self.metrics.record_queue(started - stream.arrived)
            self._record(out)
            if out.finish_reason is not None:
                del self._streams[out.request_id]
            updates.append((stream, _update(out.sequence, out.token_ids, out.finish_reason, out.error, _step(out),
                                            out.logprobs)))
        self._set_load()  # metrics first: a client that got its answer sees them up to date
        for stream, update in updates:
            stream._deliver(update)

    def _record(self, out: StepOutput) -> None:
        self.metrics.record_step(
            emitted=len(out.token_ids),
            draft_tokens=out.draft_tokens,
            accepted_tokens=out.accepted_tokens,
            speculative=out.error is None and out.sequence.spec.mode is not SpecMode.PLAIN,
            proposers=out.proposers,
            branches=out.branches,
            branch_hit=out.branch_hit,
        )

    def _finish(self, stream: RequestStream, reason: FinishReason, error: str | None = None) -> None:
        """End a stream the engine will not report on (its sequence is gone)."""
        self._streams.pop(stream.request_id, None)
        stream._deliver(_update(stream.sequence, [], reason, error))

    def _set_load(self) -> None:
        e = self.engine
        kv = {"target": e.target.cache.slots_in_use}
        if e.draft is not None:
            kv["draft"] = e.draft.cache.slots_in_use
        self.metrics.set_load(running=len(e.scheduler.running), waiting=len(e.scheduler.waiting), kv_slots=kv)


def _step(out: StepOutput) -> StepStats | None:
    if out.error is not None:
        return None
    return StepStats(out.draft_tokens, out.accepted_tokens, tuple(sorted(out.proposers.items())), out.draft_budget,
                     out.ngram_budget)


def _update(seq: Sequence, token_ids: list[int], reason: FinishReason | None, error: str | None,
            step: StepStats | None = None, logprobs=None) -> Update:
    return Update(
        request_id=seq.request_id,
        token_ids=tuple(token_ids),
        finish_reason=reason,
        prompt_tokens=seq.prompt_len,
        completion_tokens=seq.num_generated,
        verify_steps=seq.stats.verify_steps,
        draft_tokens=seq.stats.draft_tokens,
        accepted_tokens=seq.stats.accepted_tokens,
        error=error,
        proposers=tuple(sorted(seq.stats.proposers.items())),
        step=step,
        logprobs=tuple(logprobs or ()),
    )
