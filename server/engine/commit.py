"""Commit: what a verified step leaves behind.

Per sequence: the emitted tokens are appended up to a stop (EOS, the token limit, the context),
its statistics counted (nothing after the stop), a hedge branch that came true kept as the next
step's draft, and its KV brought in line: the target's accepted rows move to the end of the
committed prefix (rows past it are simply not counted), the draft keeps the rows of accepted
chain tokens. Finished sequences leave the batch and give their slots back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence as Seq

from hedgerow.drafting.branch import Hedge, match
from hedgerow.drafting.proposer import Drafts
from hedgerow.server.engine.kv_cache import SlotKVCache
from hedgerow.server.engine.scheduler import Scheduler
from hedgerow.server.engine.sequence import FinishReason, Sequence
from hedgerow.verify.accept import Acceptance


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
class Committed:
    outputs: list[StepOutput]
    ready: dict[Sequence, Hedge]  # hedge branches that came true: the next step's drafts
    drafted: list[int]  # per sequence: depth of the draft that was verified
    accepted: list[int]  # per sequence: draft tokens accepted


def commit(
    batch: Seq[Sequence],
    drafts: Drafts,
    results: Seq[Acceptance],
    hedges: Seq[list[Hedge]],
    stop_reason: Callable[[Sequence, int], FinishReason | None],
    scheduler: Scheduler,
    target_cache: SlotKVCache,
    commit_draft: Callable[[Sequence, object, int], None],
) -> Committed:
    out = Committed([], {}, [], [])
    keep_slots, keep_rows, keep_dst = [], [], []
    for seq, tree, res, branches in zip(batch, drafts.trees, results, hedges):
        start = seq.target_len
        kept, reason = [], None
        for tok in res.tokens:
            seq.tokens.append(tok)
            kept.append(tok)
            reason = stop_reason(seq, tok)
            if reason is not None:
                break
        accepted = min(res.num_accepted, len(kept))  # nothing after EOS / the limit counts
        hit = match(branches, res.num_accepted, seq.tokens[-1]) if branches and reason is None else None
        _count(seq, tree.num_draft_tokens, res.num_accepted, accepted, len(kept), branches, hit)
        out.drafted.append(int(tree.depths().max()))
        out.accepted.append(res.num_accepted)
        if hit is not None:
            out.ready[seq] = hit
        if reason is not None:
            scheduler.finish(seq, reason)
        else:
            keep_slots.append(seq.target_slot)
            keep_rows.append([start + i for i in res.path])
            keep_dst.append(start)
            seq.target_len = start + len(res.path)
            commit_draft(seq, tree, res.num_accepted)
        out.outputs.append(
            StepOutput(seq.request_id, kept, reason, seq, tree.num_draft_tokens, accepted, len(branches), hit is not None)
        )
    target_cache.compact(keep_slots, keep_rows, keep_dst)
    return out


def _count(seq: Sequence, drafted: int, num_accepted: int, accepted: int, emitted: int, branches, hit) -> None:
    stats = seq.stats
    stats.verify_steps += 1
    stats.draft_tokens += drafted
    stats.accepted_tokens += accepted
    stats.rollback_tokens += drafted - num_accepted
    stats.branches += len(branches)
    stats.branch_hits += hit is not None
    stats.rollback_tokens += sum(len(h.tail) for h in branches if h is not hit)
    stats.emitted_per_step[emitted] += 1
