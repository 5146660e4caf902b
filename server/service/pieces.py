"""What the servicer hands out, one engine step of one sample at a time, and its protobuf messages.

A ``Piece`` is one message's worth for one sample: a step's tokens, the text they complete (stop
strings applied), and the end if it is one. ``merge`` interleaves the pieces of a request's samples
as they come, each marked with its sample's index; ``stream_message`` makes one
``GenerateStreamResponse`` of a piece, ``Collected`` gathers a unary ``GenerateResponse``.
Also here: the text rules of stop strings (``find_stop``, ``safe_end``), pure functions.
"""

from __future__ import annotations

from contextlib import aclosing
from dataclasses import dataclass, field

from hedgerow.server.aio import merge as merge_sources
from hedgerow.server.engine.async_engine import Update
from hedgerow.server.engine.sequence import FinishReason
from hedgerow.server.rpc import generation_pb2 as pb
from hedgerow.server.service.requests import PROPOSER_NAMES

FINISH = {
    FinishReason.EOS: pb.FINISH_REASON_EOS,
    FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
    FinishReason.STOP: pb.FINISH_REASON_STOP,
    FinishReason.ABORT: pb.FINISH_REASON_ABORT,
}


@dataclass
class Piece:
    """One message's worth: a step's tokens, the text they complete, and the end if it is one."""

    update: Update
    text: str
    finish_reason: FinishReason | None
    logprobs: list  # pb.TokenLogprob per token of the update, when the request asked
    index: int = 0  # the sample's


async def merge(samples: list):
    """The pieces of every sample's async generator, in the order they come, each marked with its
    sample's index; the first failure of any sample ends the whole (the others are closed)."""
    async with aclosing(merge_sources(samples)) as merged:
        async for index, piece in merged:
            piece.index = index
            yield piece


def stream_message(request_id: str, piece: Piece) -> pb.GenerateStreamResponse:
    msg = pb.GenerateStreamResponse(request_id=request_id, text=piece.text, token_ids=piece.update.token_ids,
                                    logprobs=piece.logprobs, index=piece.index)
    if (step := piece.update.step) is not None:
        msg.step.CopyFrom(pb.StepStats(
            draft_tokens=step.draft_tokens, accepted_tokens=step.accepted_tokens,
            proposers=proposer_stats(step.proposers), draft_budget=step.draft_budget,
            ngram_budget=step.ngram_budget))
    if piece.finish_reason is not None:
        msg.finish_reason = FINISH[piece.finish_reason]
        msg.usage.CopyFrom(usage(piece.update))
        msg.stats.CopyFrom(stats(piece.update))
    return msg


@dataclass
class Collected:
    """A unary call's samples, gathered piece by piece."""

    texts: dict[int, list[str]] = field(default_factory=dict)
    pieces: dict[int, list[Piece]] = field(default_factory=dict)

    def add(self, piece: Piece) -> None:
        self.texts.setdefault(piece.index, []).append(piece.text)
        self.pieces.setdefault(piece.index, []).append(piece)

    def response(self, request_id: str) -> pb.GenerateResponse:
        """Sample 0 at the top level; every sample in ``samples`` when there are more."""
        def sample(i: int) -> pb.GenerateResponse:
            pieces, last = self.pieces[i], self.pieces[i][-1]
            return pb.GenerateResponse(
                request_id=request_id, text="".join(self.texts[i]), token_ids=[t for p in pieces for t in p.update.token_ids],
                finish_reason=FINISH[last.finish_reason], usage=usage(last.update), stats=stats(last.update),
                logprobs=[e for p in pieces for e in p.logprobs], index=i)

        out = sample(0)
        if len(self.pieces) > 1:
            out.samples.extend(sample(i) for i in sorted(self.pieces))
        return out


def finished_unread(stream, otherwise: str) -> str | None:
    """How a request ended in the engine if its last update is already queued but was never read
    (its client left between the engine finishing it and the handler reading that): counted so,
    not as cancelled; None if its refusal is queued (a refusal is counted once, by the handler)."""
    while not stream.queue.empty():
        item = stream.queue.get_nowait()
        if isinstance(item, BaseException):
            return None
        if item.error is not None:
            return "error"
        if item.finish_reason is not None:
            return item.finish_reason.value
    return otherwise


def find_stop(text: str, stops: tuple[str, ...], start: int) -> int | None:
    """Index of the earliest stop string in ``text[start:]``, if any."""
    hits = [i for i in (text.find(s, start) for s in stops) if i >= 0]
    return min(hits) if hits else None


def safe_end(text: str, stops: tuple[str, ...], longest: int) -> int:
    """How much of ``text`` can be sent: all but a tail that may be the start of a stop string."""
    for i in range(max(0, len(text) - longest + 1), len(text)):
        tail = text[i:]
        if any(s.startswith(tail) for s in stops):
            return i
    return len(text)


def usage(u: Update) -> pb.Usage:
    return pb.Usage(prompt_tokens=u.prompt_tokens, completion_tokens=u.completion_tokens)


def stats(u: Update) -> pb.Stats:
    return pb.Stats(verify_steps=u.verify_steps, draft_tokens=u.draft_tokens, accepted_tokens=u.accepted_tokens,
                    proposers=proposer_stats(u.proposers))


def proposer_stats(proposers) -> list[pb.ProposerStats]:
    """``(name, ProposerCounts)`` pairs as messages, model first (the order of PROPOSER_NAMES)."""
    counts = dict(proposers)
    return [pb.ProposerStats(proposer=PROPOSER_NAMES[kind], draft_tokens=counts[kind.value].draft_tokens,
                             accepted_tokens=counts[kind.value].accepted_tokens)
            for kind in PROPOSER_NAMES if kind.value in counts]
