"""Commit: what a verified step leaves behind.

Per sequence: the emitted tokens are appended up to a stop (EOS, the token limit, the context),
its statistics counted (nothing after the stop), per proposer too, a hedge branch that came true
kept as the next step's draft, and its KV brought in line: the target's accepted rows move to the
end of the committed prefix (rows past it are simply not counted), the draft keeps the rows of
accepted chain tokens it drafted. Finished sequences leave the batch and give their slots back.

Per proposer, every draft node is counted once, for the proposer that put it in the tree: the
draft model's nodes come first (``DraftTree.ruled``), the n-gram's after; an n-gram token the
model's draft already held is the model's node. So the per-proposer counts add up to the step's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence as Seq

from hedgerow.drafting.branch import Hedge, match
from hedgerow.drafting.plan import StepPlan
from hedgerow.drafting.proposer import Drafts
from hedgerow.server.engine.kv_cache import SlotKVCache
from hedgerow.server.engine.scheduler import Scheduler
from hedgerow.server.engine.sequence import FinishReason, ProposerCounts, Sequence
from hedgerow.verify.accept import Acceptance
from hedgerow.verify.tree import DraftTree


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
    # the draft and accepted tokens above by proposer ("model", "ngram"), for each that drafted
    proposers: dict[str, ProposerCounts] = field(default_factory=dict)
    logprobs: list | None = None  # per committed token, the target's TokenLogprob, when the request asks
    draft_budget: int = 0  # the draft model's tokens (chain) or nodes (tree) the policy allowed this step
    ngram_budget: int = 0  # the n-gram nodes the policy allowed this step


@dataclass
class Committed:
    outputs: list[StepOutput]
    ready: dict[Sequence, Hedge]  # hedge branches that came true: the next step's drafts
    drafted: list[int]  # per sequence: depth of the draft model's part of the verified tree
    accepted: list[int]  # per sequence: of the draft model's tokens, those accepted
    ngram: list[tuple[int, int]]  # per sequence: n-gram continuation offered, its tokens emitted in order


def commit(
    batch: Seq[Sequence],
    plan: StepPlan,
    drafts: Drafts,
    results: Seq[Acceptance],
    hedges: Seq[list[Hedge]],
    stop_reason: Callable[[Sequence, int], FinishReason | None],
    scheduler: Scheduler,
    target_cache: SlotKVCache,
    commit_draft: Callable[[Sequence, DraftTree, list[int]], None],
) -> Committed:
    out = Committed([], {}, [], [], [])
    keep_slots, keep_rows, keep_dst = [], [], []
    ngram_budgets = plan.ngram or [0] * len(batch)
    for seq, tree, res, branches, offered, budget, ngram_budget in zip(
            batch, drafts.trees, results, hedges, drafts.ngram, plan.sizes, ngram_budgets):
        start = seq.target_len
        kept, reason = [], None
        for tok in res.tokens:
            seq.tokens.append(tok)
            kept.append(tok)
            reason = stop_reason(seq, tok)
            if reason is not None:
                break
        accepted = min(res.num_accepted, len(kept))  # nothing after EOS / the limit counts
        by_model = sum(1 for u in res.path[1:] if u < tree.ruled)  # the model's nodes come first on a path
        # hedges bet on outcomes of the model's chain: a path into n-gram nodes is none of them
        hedged = branches and reason is None and by_model == res.num_accepted
        hit = match(branches, res.num_accepted, seq.tokens[-1]) if hedged else None
        proposers = _by_proposer(tree, by_model, accepted)
        _count(seq, tree.num_draft_tokens, res.num_accepted, accepted, len(kept), branches, hit, proposers)
        out.drafted.append(int(tree.depths()[: tree.ruled].max()))
        out.accepted.append(by_model)
        out.ngram.append(_as_if_alone(offered, res.tokens))
        if hit is not None:
            out.ready[seq] = hit
        if reason is not None:
            scheduler.finish(seq, reason)
        else:
            keep_slots.append(seq.target_slot)
            keep_rows.append([start + i for i in res.path])
            keep_dst.append(start)
            seq.target_len = start + len(res.path)
            commit_draft(seq, tree, res.path)
        out.outputs.append(StepOutput(seq.request_id, kept, reason, seq, tree.num_draft_tokens, accepted,
                                      len(branches), hit is not None, proposers=proposers, draft_budget=budget,
                                      ngram_budget=ngram_budget,
                                      logprobs=res.logprobs[: len(kept)] if res.logprobs is not None else None))
    target_cache.compact(keep_slots, keep_rows, keep_dst)
    return out


def _by_proposer(tree: DraftTree, by_model: int, accepted: int) -> dict[str, ProposerCounts]:
    """Draft and kept accepted tokens per proposer that drafted (``accepted`` is cut at a stop,
    which ends the path: the model's part of it first)."""
    model, ngram = tree.ruled - 1, tree.num_nodes - tree.ruled
    out = {}
    if model:
        out["model"] = ProposerCounts(model, min(by_model, accepted))
    if ngram:
        out["ngram"] = ProposerCounts(ngram, accepted - min(by_model, accepted))
    return out


def _as_if_alone(offered, emitted: list[int]) -> tuple[int, int]:
    """The n-gram's longest continuation offered, and the most tokens of one that the step emitted
    in order: what it would have had accepted alone (a point mass on x is accepted exactly when the
    target's own draw is x), for the cost policy's n-gram acceptance."""
    if not offered:
        return 0, 0
    hits = [next((i for i, (a, b) in enumerate(zip(c, emitted)) if a != b), min(len(c), len(emitted))) for c in offered]
    return max(map(len, offered)), max(hits)


def _count(seq: Sequence, drafted: int, num_accepted: int, accepted: int, emitted: int, branches, hit,
           proposers: dict[str, ProposerCounts]) -> None:
    stats = seq.stats
    stats.verify_steps += 1
    stats.draft_tokens += drafted
    stats.accepted_tokens += accepted
    stats.rollback_tokens += drafted - num_accepted
    stats.branches += len(branches)
    stats.branch_hits += hit is not None
    stats.rollback_tokens += sum(len(h.tail) for h in branches if h is not hit)
    stats.emitted_per_step[emitted] += 1
    for name, counts in proposers.items():
        stats.proposers[name] = stats.proposers.get(name, ProposerCounts()) + counts
