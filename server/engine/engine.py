"""The engine: one speculative step over the running batch, and request bookkeeping.

    step:  admit -> room (n-gram lookup) -> plan -> propose -> flatten -> verify -> accept -> commit -> observe

Plain decoding (``SpecMode.PLAIN``) is the same step with a tree of one node (the root), so the
baseline and speculative modes share every line of the runner. Values go forward: the policy's
``StepPlan`` to the proposer, its ``Drafts`` to verification and commit, one ``StepReport`` back
to the policy.
"""

from __future__ import annotations

import time
import weakref
from dataclasses import dataclass
from typing import Iterable

from hedgerow.drafting.draft_model import DraftModel
from hedgerow.drafting.plan import Policy, Room, StepReport, StepSeconds
from hedgerow.drafting.policy import make_policy
from hedgerow.drafting.proposer import Proposer
from hedgerow.drafting.spec import SpecParams
from hedgerow.server.engine.commit import StepOutput, commit
from hedgerow.server.engine.config import EngineConfig
from hedgerow.server.errors import HedgerowError, OverloadedError
from hedgerow.server.engine.failures import isolate
from hedgerow.server.engine.runner import ModelRunner
from hedgerow.server.engine.scheduler import Scheduler
from hedgerow.server.engine.sequence import FinishReason, Request, Sequence
from hedgerow.server.engine.timing import Clock, PhaseClock, PhaseTotals, pass_timer
from hedgerow.server.engine.verifier import Verifier
from hedgerow.verify.flatten import flatten
from hedgerow.verify.logprobs import MAX_TOP_LOGPROBS


@dataclass
class StepResult:
    outputs: list[StepOutput]
    phases: dict[str, float] | None  # seconds per phase; None when no sequence was decoded


class Engine:
    def __init__(
        self,
        target: ModelRunner,
        draft: ModelRunner | None,
        *,
        eos_token_ids: Iterable[int],
        config: EngineConfig = EngineConfig(),
        policy: Policy | None = None,
        clock: Clock = time.perf_counter,
    ):
        self.target, self.draft, self.config, self.clock = target, draft, config, clock
        self._check_draft(config.spec.resolve(draft is not None), "")
        self.eos_token_ids = frozenset(eos_token_ids)
        self.scheduler = Scheduler(target.cache, draft.cache if draft else None, config.max_waiting)
        self.policy = policy if policy is not None else make_policy(config.adaptive)
        drafter = DraftModel(draft, target.vocab_size, config.prefill_chunk) if draft is not None else None
        self.proposer = Proposer(drafter, config.hedge_alternatives, config.ngram_pool)
        # without a draft model nothing drafts with one: its line is timed on the target, unused
        self.policy.calibrate(pass_timer({"target": target, "draft": draft or target}, clock))
        self.verifier = Verifier(target, overlap=config.hedge_alternatives is not None and draft is not None,
                                 eos_token_ids=self.eos_token_ids)
        self.times = PhaseTotals()
        self._ready: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # sequence -> hedge that came true
        self._busy_since: float | None = None  # end of the last step, while requests remained

    # --- requests ------------------------------------------------------------------------------
    def add_request(self, request: Request) -> Sequence:
        """Validate and queue a request. Raises HedgerowError naming the bad field."""
        spec = (request.spec or self.config.spec).resolve(self.draft is not None)
        n = len(request.prompt_ids)
        if n == 0:
            raise HedgerowError("prompt is empty")
        if n >= self.config.max_model_len:
            raise HedgerowError(
                f"prompt is {n} tokens; the context holds {self.config.max_model_len} (prompt + at least 1 new token)"
            )
        bad = [t for t in request.prompt_ids if not 0 <= t < self.target.vocab_size]
        if bad:
            raise HedgerowError(f"prompt_token_ids: {bad[0]} is outside the vocabulary [0, {self.target.vocab_size})")
        if request.max_new_tokens < 1:
            raise HedgerowError(f"max_new_tokens must be >= 1, got {request.max_new_tokens}")
        if not 0 <= request.min_tokens <= request.max_new_tokens:
            raise HedgerowError(f"min_tokens must be in [0, max_new_tokens {request.max_new_tokens}], "
                                f"got {request.min_tokens}")
        if request.logprobs is not None and not 0 <= request.logprobs <= MAX_TOP_LOGPROBS:
            raise HedgerowError(f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {request.logprobs}")
        bad = [t for t in request.stop_token_ids if not 0 <= t < self.target.vocab_size]
        if bad:
            raise HedgerowError(f"stop_token_ids: {bad[0]} is outside the vocabulary [0, {self.target.vocab_size})")
        self._check_draft(spec, "; this server has none")
        if self.scheduler.find(request.request_id) is not None:
            raise HedgerowError(f"request_id {request.request_id!r} is already in flight")
        seq = Sequence(request, spec)
        try:
            self.scheduler.add(seq)
        except OverflowError as exc:
            raise OverloadedError(str(exc)) from None
        return seq

    def _check_draft(self, spec: SpecParams, where: str) -> None:
        if spec.uses_model and self.draft is None:
            raise HedgerowError(f"speculation mode {spec.mode.value} with proposer {spec.proposer.value} needs a "
                                f"draft model{where} (proposer ngram needs none)")

    def abort(self, request_id: str, reason: FinishReason = FinishReason.ABORT) -> bool:
        """End a request now (cancelled, deadline, a stop string seen by the caller); frees its slots."""
        seq = self.scheduler.find(request_id)
        if seq is None:
            return False
        self.scheduler.finish(seq, reason)
        return True

    def has_work(self) -> bool:
        return len(self.scheduler) > 0

    def close(self) -> None:
        self.verifier.close()

    # --- the step ------------------------------------------------------------------------------
    def step(self) -> StepResult:
        """One step over the running batch; a failure fails only the requests it comes from."""
        clock = PhaseClock(self.clock)
        between = clock.start - self._busy_since if self._busy_since is not None else 0.0
        outputs = isolate(self.scheduler.admit(), self._prefill, self._fail, "prefill")
        clock.lap("prefill")

        def decode(batch: list[Sequence]) -> list[StepOutput]:
            rooms = [self.room(s) for s in batch]
            plan = self.policy.plan(batch, rooms)
            ready = {s: self._ready.pop(s) for s in batch if s in self._ready}
            drafts = self.proposer.propose(batch, plan, rooms, ready)
            clock.lap("draft")
            flat = flatten(drafts.trees, [s.target_len for s in batch])
            results, hedges = self.verifier.verify(batch, drafts, flat, lambda: self.proposer.hedge(batch, drafts))
            clock.lap("verify")
            done = commit(batch, plan, drafts, results, hedges, self._stop_reason, self.scheduler, self.target.cache,
                          self.proposer.commit)
            self._ready.update(done.ready)
            self.proposer.retire([o.sequence for o in done.outputs if o.finish_reason is not None])
            clock.lap("commit")
            phases = clock.phases
            self.policy.observe(StepReport(
                plan, batch, done.drafted, done.accepted, emitted=sum(len(o.token_ids) for o in done.outputs),
                verify_tokens=int(flat.num_nodes.sum()), draft_passes=drafts.passes,
                seconds=StepSeconds(phases["draft"], phases["verify"], phases["commit"], between), ngram=done.ngram,
            ))
            return done.outputs

        batch = list(self.scheduler.running)
        if batch:
            outputs += isolate(batch, decode, self._fail, "engine step")
            self.times.add(clock.phases)
        self._busy_since = self.clock() if self.has_work() else None
        return StepResult(outputs, clock.phases if batch else None)

    def room(self, seq: Sequence) -> Room:
        """What ``seq`` may draft: a step emits at most depth + 1 tokens, the root plus every
        draft node need a KV row, and n-gram lookup offers what it finds."""
        rows = self.config.max_model_len - len(seq.tokens) - 1
        depth = max(0, min(seq.request.max_new_tokens - seq.num_generated - 1, rows))
        return Room(depth=depth, rows=max(0, rows), ngram=self.proposer.ngram.find(seq, depth))

    def _prefill(self, seqs: list[Sequence]) -> list[StepOutput]:
        """Cache every prompt token but the last, in the target and (for sequences that may draft)
        the draft; the last is the first step's root. The draft's prefill belongs here, not to
        the first drafting step: a step's time must be a step's, for the cost policy's clock.

        A sample forked from another (``Request.fork_of``) copies that one's prompt rows, slot to
        slot, instead of computing them: n samples of a prompt pay for one prefill. The copy comes
        after the source's own prefill in this call, or from a source prefilled in an earlier step
        (rows below its committed length never change); with no such source it prefills itself."""
        sources = {s: self._fork_source(s, seqs) for s in seqs if s.prompt_len > 1}
        for runner, slot in ((self.target, "target_slot"), (self.draft, "draft_slot")):
            rows = [s for s in sources if getattr(s, slot) is not None]
            copies = [s for s in rows if sources[s] is not None and getattr(sources[s], slot) is not None]
            fresh = [s for s in rows if s not in copies]
            if runner is not None and fresh:
                runner.extend([getattr(s, slot) for s in fresh], [0] * len(fresh), [s.tokens[:-1] for s in fresh],
                              self.config.prefill_chunk)
            for s in copies if runner is not None else ():
                runner.cache.copy_rows(getattr(sources[s], slot), getattr(s, slot), s.prompt_len - 1)
        for s in seqs:
            s.target_len = s.prompt_len - 1
            if s.draft_slot is not None:
                s.draft_len = s.prompt_len - 1
        return []

    def _fork_source(self, seq: Sequence, admitted: list[Sequence]) -> Sequence | None:
        """The running sequence whose prompt rows ``seq`` may copy: the one ``fork_of`` names, of the
        same prompt, not itself a fork, and prefilled by now (admitted with ``seq``, or before)."""
        if seq.request.fork_of is None:
            return None
        src = self.scheduler.find(seq.request.fork_of)
        if src is None or src is seq or src.target_slot is None or src.request.fork_of is not None \
                or src.request.prompt_ids != seq.request.prompt_ids:
            return None
        return src if src in admitted or src.target_len >= src.prompt_len - 1 else None

    def _fail(self, seq: Sequence, exc: Exception) -> StepOutput:
        self.scheduler.finish(seq, FinishReason.ERROR)
        return StepOutput(seq.request_id, [], FinishReason.ERROR, seq, error=f"{type(exc).__name__}: {exc}")

    def _stop_reason(self, seq: Sequence, token: int) -> FinishReason | None:
        if token in self.eos_token_ids and not seq.request.ignore_eos:
            return FinishReason.EOS
        if token in seq.request.stop_token_ids:
            return FinishReason.STOP
        if seq.num_generated >= seq.request.max_new_tokens or len(seq.tokens) >= self.config.max_model_len:
            return FinishReason.LENGTH
        return None

    # --- offline helper ------------------------------------------------------------------------
    def generate(self, requests: Iterable[Request]) -> dict[str, Sequence]:
        """Run requests to completion (tests, CLI, bench); returns the finished sequences by id."""
        seqs = {r.request_id: self.add_request(r) for r in requests}
        while self.has_work():
            for out in self.step().outputs:
                if out.error:
                    raise RuntimeError(f"request {out.request_id} failed: {out.error}")
        return seqs

