"""The draft-size policy interface: ``plan`` before a step, ``observe`` after it.

A policy decides how many draft tokens (chain) or tree nodes each sequence gets this step: a
``StepPlan``. After the step it gets one ``StepReport``, which carries the plan back, so nothing
is stashed between the two calls. Whatever a policy remembers per sequence it keeps itself,
keyed by the sequence. The base ``Policy`` is ``none``: the configured sizes every step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

from hedgerow.drafting.chain import StopDrafting
from hedgerow.drafting.costs import MeasurePass
from hedgerow.drafting.spec import SpecMode, SpecParams


class PolicySequence(Protocol):
    spec: SpecParams


@dataclass(frozen=True)
class Room:
    """What a sequence may draft this step."""

    depth: int  # the longest useful chain: tokens still to generate, less the target's own, within ``rows``
    rows: int  # draft tokens its KV slot can still verify (a tree's node cap)

    def limit(self, spec: SpecParams) -> int:
        """The most a sequence of this mode may draft in this room (0 for plain decoding)."""
        return {SpecMode.CHAIN: self.depth, SpecMode.TREE: self.rows}.get(spec.mode, 0)

    def cap(self, spec: SpecParams) -> int:
        """The configured size of the sequence's mode, within this room."""
        return min(spec.configured_size, self.limit(spec))


@dataclass(frozen=True)
class StepPlan:
    sizes: list[int]  # per sequence: draft tokens of its chain, or nodes of its tree; 0 = plain decoding
    stop_drafting: StopDrafting | None = None  # chains: asked with each next-token distribution
    basis: object = None  # what the policy that made the plan needs back in ``observe``


@dataclass(frozen=True)
class StepSeconds:
    draft: float
    verify: float
    commit: float
    between: float = 0.0  # the caller's time since the last busy step (a server streams every step)

    @property
    def total(self) -> float:
        return self.draft + self.verify + self.commit + self.between


@dataclass(frozen=True)
class StepReport:
    """What one step did, for the policy that planned it."""

    plan: StepPlan
    seqs: Sequence[PolicySequence]
    drafted: list[int]  # per sequence: depth of the draft sent to verification (0: none)
    accepted: list[int]  # per sequence: draft tokens accepted
    emitted: int  # tokens the step committed, over all sequences
    verify_tokens: int  # nodes in the target pass, roots included
    draft_passes: list[int]  # tokens of each draft pass, in order
    seconds: StepSeconds

    @property
    def speculated(self) -> bool:
        return any(self.drafted)


class Policy:
    """``none``: the configured sizes. Subclasses override ``plan`` and ``observe``."""

    name = "none"

    def plan(self, seqs: Sequence[PolicySequence], rooms: Sequence[Room]) -> StepPlan:
        return StepPlan([r.cap(s.spec) for s, r in zip(seqs, rooms)])

    def observe(self, report: StepReport) -> None:
        pass

    def calibrate(self, measure: MeasurePass) -> None:
        """Learn the pair's pass costs at start-up (only the cost policy uses them)."""
