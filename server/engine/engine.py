"""The engine: one speculative step over the running batch, and request bookkeeping.

    step():  admit -> propose -> flatten -> target forward -> accept -> commit

Plain decoding (``SpecMode.AR``) is the same step with a tree of one node (the root), so the
baseline and speculative modes share every line of the runner.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Iterable

import torch

from hedgerow.drafting.branch import Brancher, match
from hedgerow.drafting.chain import ChainProposer
from hedgerow.drafting.draft_model import DraftModel
from hedgerow.drafting.policy import POLICIES, CostPolicy, make_policy
from hedgerow.drafting.tree import TreeProposer, TreeShape, static_shape
from hedgerow.server.engine.errors import HedgerowError
from hedgerow.server.engine.runner import ModelRunner
from hedgerow.server.engine.scheduler import Scheduler
from hedgerow.server.engine.sequence import FinishReason, Request, Sequence, SpecMode, SpecParams
from hedgerow.verify.accept import Acceptance, accept
from hedgerow.verify.flatten import flatten
from hedgerow.verify.tree import DraftTree

log = logging.getLogger("hedgerow.engine")
OVERLAPS = ("none", "pearl", "branch")


@dataclass(frozen=True)
class EngineConfig:
    max_model_len: int = 2048  # prompt + generated tokens per sequence (the KV slot length)
    max_batch_size: int = 16  # sequences decoded together (KV slots per model)
    max_waiting: int = 1024  # queued requests beyond the batch; more are refused
    prefill_chunk: int = 512  # prompt tokens per sequence per prefill pass
    spec: SpecParams = SpecParams()  # default speculation settings of requests that give none
    adaptive: str = "cost"  # draft-length policy: none | heuristic | confidence | cost (drafting/policy.py)
    overlap: str = "none"  # none | pearl | branch: draft hedge branches while the target verifies
    branch_alternatives: int = 2  # alternatives to the last draft token, for overlap=branch

    def __post_init__(self) -> None:
        for name in ("max_model_len", "max_batch_size", "prefill_chunk"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.adaptive not in POLICIES:
            raise ValueError(f"adaptive must be one of {', '.join(POLICIES)}, got {self.adaptive!r}")
        if self.overlap not in OVERLAPS:
            raise ValueError(f"overlap must be one of {', '.join(OVERLAPS)}, got {self.overlap!r}")


@dataclass
class StepOutput:
    request_id: str
    token_ids: list[int]  # tokens committed by this step
    finish_reason: FinishReason | None
    sequence: Sequence
    draft_tokens: int = 0  # draft tokens this step sent to verification
    accepted_tokens: int = 0  # of which accepted and kept (the first ``accepted_tokens`` positions)
    branches: int = 0  # hedge branches drafted during this step's verification
    branch_hit: bool = False  # one of them came true: it is the next step's draft
    error: str | None = None


@dataclass
class StepTimes:
    """Seconds spent per phase, summed over steps (the server turns them into histograms)."""

    phases: dict[str, float] = field(default_factory=dict)

    def add(self, phase: str, seconds: float) -> None:
        self.phases[phase] = self.phases.get(phase, 0.0) + seconds


class Engine:
    def __init__(
        self,
        target: ModelRunner,
        draft: ModelRunner | None,
        *,
        eos_token_ids: Iterable[int],
        config: EngineConfig = EngineConfig(),
    ):
        if draft is None and config.spec.mode is not SpecMode.AR:
            raise HedgerowError(f"speculation mode {config.spec.mode.value} needs a draft model")
        self.target = target
        self.draft = draft
        self.config = config
        self.eos_token_ids = frozenset(eos_token_ids)
        self.scheduler = Scheduler(target.cache, draft.cache if draft else None, config.max_waiting)
        self.policy = make_policy(config.adaptive)
        self.drafter = DraftModel(draft, target.vocab_size, config.prefill_chunk) if draft else None
        self.chain = ChainProposer(self.drafter, self.policy.stop_drafting) if draft else None
        self.tree = TreeProposer(self.drafter) if draft else None
        self.brancher = None
        self._target_stream = None
        if draft is not None and config.overlap != "none":
            self.brancher = Brancher(self.drafter, config.branch_alternatives if config.overlap == "branch" else 0)
            self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hedgerow-target")
            self._target_stream = torch.cuda.Stream(target.device) if target.device.type == "cuda" else None
        self.times = StepTimes()
        self._busy_since: float | None = None  # end of the last step, while requests remained
        self._between = 0.0  # seconds the caller spent between that step and this one
        self.last_step_phases: dict[str, float] = {}
        if isinstance(self.policy, CostPolicy) and draft is not None:
            self.calibrate()

    # --- requests ------------------------------------------------------------------------------
    def add_request(self, request: Request) -> Sequence:
        """Validate and queue a request. Raises HedgerowError naming the bad field."""
        spec = request.spec or self.config.spec
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
        if spec.mode is not SpecMode.AR and self.draft is None:
            raise HedgerowError(f"speculation mode {spec.mode.value} needs a draft model; this server has none")
        if self.scheduler.find(request.request_id) is not None:
            raise HedgerowError(f"request_id {request.request_id!r} is already in flight")
        seq = Sequence(request, spec)
        try:
            self.scheduler.add(seq)
        except OverflowError as exc:
            raise OverloadedError(str(exc)) from None
        return seq

    def abort(self, request_id: str, reason: FinishReason = FinishReason.ABORT) -> bool:
        """End a request now (cancelled, deadline, a stop string seen by the caller); frees its slots."""
        seq = self.scheduler.find(request_id)
        if seq is None:
            return False
        self.scheduler.finish(seq, reason)
        return True

    def has_work(self) -> bool:
        return len(self.scheduler) > 0

    # --- the step ------------------------------------------------------------------------------
    def step(self) -> list[StepOutput]:
        """One step over the running batch. A failure fails only the requests it comes from: the
        batch is retried one sequence at a time (a failed pass never touches committed KV rows)."""
        t0 = time.perf_counter()
        self._between = t0 - self._busy_since if self._busy_since is not None else 0.0
        admitted = self.scheduler.admit()
        outputs: list[StepOutput] = []
        if admitted:
            try:
                self._prefill(admitted)
            except Exception:
                log.exception("batched prefill failed; retrying one by one")
                for seq in admitted:
                    try:
                        self._prefill([seq])
                    except Exception as exc:
                        log.exception("prefill failed for request %s", seq.request_id)
                        outputs.append(self._fail(seq, exc))
        phases = {"prefill": time.perf_counter() - t0}
        batch = list(self.scheduler.running)
        if not batch:
            self._busy_since = None
            return outputs
        try:
            outputs += self._step(batch, phases)
        except Exception:
            log.exception("engine step failed for a batch of %d; retrying one by one", len(batch))
            for seq in batch:
                try:
                    outputs += self._step([seq], phases)
                except Exception as exc:
                    log.exception("request %s failed", seq.request_id)
                    outputs.append(self._fail(seq, exc))
        for k, v in phases.items():
            self.times.add(k, v)
        self.last_step_phases = phases
        self._busy_since = time.perf_counter() if self.has_work() else None
        return outputs

    def _step(self, batch: list[Sequence], phases: dict[str, float]) -> list[StepOutput]:
        t = time.perf_counter()
        if self.drafter is not None:
            self.drafter.passes = []
        trees = self._propose(batch)
        phases["draft"] = time.perf_counter() - t
        t = time.perf_counter()
        flat = flatten(trees, [s.target_len for s in batch])
        if self.brancher is None:
            results = self._verify(batch, trees, flat)
            hedges = None
        else:  # the target verifies in its worker while the draft hedges here
            future = self._worker.submit(self._verify, batch, trees, flat)
            try:
                hedges = self._hedge(batch, trees)
            except Exception:
                future.exception()  # never retry while the target is still writing its cache
                raise
            results = future.result()
        phases["verify"] = time.perf_counter() - t
        t = time.perf_counter()
        outputs = self._commit(batch, trees, results, hedges)
        phases["commit"] = time.perf_counter() - t
        self.policy.observe_step(
            int(flat.num_nodes.sum()), phases["verify"], self.drafter.passes if self.drafter else [], phases["draft"]
        )
        self.policy.observe_rate(  # the step's measured cost: the cost policy's clock (chain scales, tree arms)
            any(t.num_draft_tokens for t in trees),
            sum(len(o.token_ids) for o in outputs),
            phases["draft"] + phases["verify"] + phases["commit"] + self._between,
        )
        return outputs

    def _verify(self, batch: list[Sequence], trees: list[DraftTree], flat) -> list[Acceptance]:
        """One target pass over every tree, then acceptance."""
        stream = self._target_stream
        with torch.cuda.stream(stream) if stream is not None else nullcontext():
            logits = self.target.logits(self.target.forward([s.target_slot for s in batch], flat))
            return accept(trees, logits, [s.sampling for s in batch], [s.generator(self.target.device) for s in batch])

    def _hedge(self, batch: list[Sequence], trees: list[DraftTree]) -> list[list]:
        hedges: list[list] = [[] for _ in batch]
        idx = [i for i, s in enumerate(batch) if s.spec.mode is SpecMode.CHAIN and trees[i].num_draft_tokens]
        if idx:
            found = self.brancher.hedge(
                [batch[i] for i in idx],
                [trees[i] for i in idx],
                [self._chain_logits[i] for i in idx],
                [batch[i].spec.draft_tokens for i in idx],
            )
            for i, h in zip(idx, found):
                hedges[i] = h
        return hedges

    def _fail(self, seq: Sequence, exc: Exception) -> StepOutput:
        self.scheduler.finish(seq, FinishReason.ERROR)
        return StepOutput(seq.request_id, [], FinishReason.ERROR, seq, error=f"{type(exc).__name__}: {exc}")

    def _prefill(self, seqs: list[Sequence]) -> None:
        """Cache every prompt token but the last; the last is the first step's root."""
        todo = [s for s in seqs if s.prompt_len > 1]
        if todo:
            self.target.extend(
                [s.target_slot for s in todo], [0] * len(todo), [s.tokens[:-1] for s in todo], self.config.prefill_chunk
            )
        for s in seqs:
            s.target_len = s.prompt_len - 1

    def _limits(self, seq: Sequence) -> tuple[int, int]:
        """(deepest useful draft, draft tokens the KV slot can verify) for this step: a step emits
        at most depth + 1 tokens, and the root plus every draft node need a KV row."""
        depth = seq.request.max_new_tokens - seq.num_generated - 1
        rows = self.config.max_model_len - len(seq.tokens) - 1
        return max(0, min(depth, rows)), max(0, rows)

    @staticmethod
    def _take_ready(seq: Sequence, limit: int):
        """The hedge branch that came true last step, cut to what this step may verify."""
        hedge, seq.ready_hedge = seq.ready_hedge, None
        if hedge is None or limit < 1:
            return None
        hedge.tail, hedge.probs = hedge.tail[:limit], hedge.probs[:limit]
        return hedge

    def _tree_shape(self, seq: Sequence, budget: int) -> TreeShape:
        spec = seq.spec
        depth = min(spec.tree_depth, self._limits(seq)[0], budget)
        static = static_shape(budget, depth, spec.tree_topk) if spec.tree_static else None
        return TreeShape(budget=budget, depth=depth, topk=spec.tree_topk, static=static)

    def _propose(self, batch: list[Sequence]) -> list[DraftTree]:
        """Per mode: the policy sizes each sequence's draft within its limits, the proposer drafts."""
        trees = [DraftTree.root_only(s.tokens[-1]) for s in batch]
        self.policy.start_step()
        self._chain_logits: list = [None] * len(batch)  # draft logits of each chain's last token, for hedging
        for mode in (SpecMode.CHAIN, SpecMode.TREE):
            idx = [i for i, s in enumerate(batch) if s.spec.mode is mode]
            if not idx:
                continue
            group = [batch[i] for i in idx]
            if mode is SpecMode.CHAIN:
                limits = [self._limits(s)[0] for s in group]
                sizes = self.policy.plan(group, [s.spec.draft_tokens for s in group], limits)
                ready = [self._take_ready(s, lim) for s, lim in zip(group, limits)]
                sizes = [max(n, len(r.tail)) if r else n for n, r in zip(sizes, ready)]
                proposed = self.chain.propose(group, sizes, ready)
                for i, lg in zip(idx, self.chain.last_logits):
                    self._chain_logits[i] = lg
            else:
                limits = [self._limits(s)[1] for s in group]
                sizes = self.policy.plan_trees(group, [s.spec.tree_budget for s in group], limits)
                proposed = self.tree.propose(group, [self._tree_shape(s, n) for s, n in zip(group, sizes)])
            for i, tree in zip(idx, proposed):
                trees[i] = tree
        return trees

    def _commit(
        self, batch: list[Sequence], trees: list[DraftTree], results: list[Acceptance], hedges: list[list] | None = None
    ) -> list[StepOutput]:
        outputs, keep_slots, keep_rows, keep_dst = [], [], [], []
        for n, (seq, tree, res) in enumerate(zip(batch, trees, results)):
            start = seq.target_len
            kept, reason = [], None
            for tok in res.tokens:
                seq.tokens.append(tok)
                kept.append(tok)
                reason = self._stop_reason(seq, tok)
                if reason is not None:
                    break
            accepted = min(res.num_accepted, len(kept))  # nothing after EOS / the limit counts
            seq.stats.verify_steps += 1
            seq.stats.draft_tokens += tree.num_draft_tokens
            seq.stats.accepted_tokens += accepted
            seq.stats.rollback_tokens += tree.num_draft_tokens - res.num_accepted
            hit = None
            branches = hedges[n] if hedges else []
            if branches and reason is None:
                hit = match(branches, res.num_accepted, seq.tokens[-1])
                seq.ready_hedge = hit
            seq.stats.branches += len(branches)
            seq.stats.branch_hits += hit is not None
            seq.stats.rollback_tokens += sum(len(h.tail) for h in branches if h is not hit)
            seq.stats.emitted_per_step[len(kept)] += 1
            if tree.num_draft_tokens:
                self.policy.observe(seq, int(tree.depths().max()), res.num_accepted)
            if reason is not None:
                self.scheduler.finish(seq, reason)
            else:
                keep_slots.append(seq.target_slot)
                keep_rows.append([start + i for i in res.path])
                keep_dst.append(start)
                seq.target_len = start + len(res.path)
                if seq.spec.mode is SpecMode.CHAIN:
                    self.chain.commit(seq, tree, res.num_accepted)
            outputs.append(
                StepOutput(seq.request_id, kept, reason, seq, tree.num_draft_tokens, accepted, len(branches), hit is not None)
            )
        self.target.cache.compact(keep_slots, keep_rows, keep_dst)
        return outputs

    def _stop_reason(self, seq: Sequence, token: int) -> FinishReason | None:
        if token in self.eos_token_ids and not seq.request.ignore_eos:
            return FinishReason.EOS
        if seq.num_generated >= seq.request.max_new_tokens or len(seq.tokens) >= self.config.max_model_len:
            return FinishReason.LENGTH
        return None

    # --- cost model ------------------------------------------------------------------------------
    def calibrate(self, sizes: tuple[int, ...] = (1, 4, 16, 32), repeats: int = 3) -> None:
        """Seed the cost policy with measured forward times of both models (scratch slot, so no
        sequence is touched): the fastest of ``repeats`` runs per size, after a warm-up round, so a
        busy machine does not teach it a pessimistic model. Online measurements refine it."""
        for runner, cost in ((self.target, self.policy.verify), (self.draft, self.policy.draft)):
            scratch = runner.cache.scratch_slot
            best = {n: float("inf") for n in sizes}
            for rep in range(repeats + 1):  # round 0 warms up kernels and the allocator
                for n in sizes:
                    flat = flatten([DraftTree(torch.zeros(n, dtype=torch.long), torch.arange(n) - 1)], [0])
                    t = time.perf_counter()
                    runner.logits(runner.forward([scratch], flat)[:, -1]).argmax(-1).tolist()
                    if rep:
                        best[n] = min(best[n], time.perf_counter() - t)
            cost.fit([(n, best[n]) for n in sizes])
        self.policy.catch_up.fit([(n, self.policy.draft(n)) for n in sizes])  # until measured online

    # --- offline helper ------------------------------------------------------------------------
    def generate(self, requests: Iterable[Request]) -> dict[str, Sequence]:
        """Run requests to completion (tests, CLI, bench); returns the finished sequences by id."""
        seqs = {r.request_id: self.add_request(r) for r in requests}
        while self.has_work():
            for out in self.step():
                if out.error:
                    raise RuntimeError(f"request {out.request_id} failed: {out.error}")
        return seqs


class OverloadedError(HedgerowError):
    """The waiting queue is full (the server maps it to RESOURCE_EXHAUSTED)."""
