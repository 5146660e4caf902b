"""The draft-size policy interface: ``plan`` before a step, ``observe`` after it.

A policy decides how many draft tokens (chain) or tree nodes each sequence gets this step, from
the draft model and from n-gram lookup: a ``StepPlan``. After the step it gets one
``StepReport``, which carries the plan back, so nothing is stashed between the two calls.
Whatever a policy remembers per sequence it keeps itself, keyed by the sequence. The base
``Policy`` is ``none``: the configured sizes every step.
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
    # what n-gram lookup offers this step (drafting/ngram.py), best first; found before planning,
    # so that a policy prices what is really there
    ngram: tuple[tuple[int, ...], ...] = ()

    def limit(self, spec: SpecParams) -> int:
        """The most a sequence of this mode may draft in this room (0 for plain decoding)."""
        return {SpecMode.CHAIN: self.depth, SpecMode.TREE: self.rows}.get(spec.mode, 0)

    def cap(self, spec: SpecParams) -> int:
        """The configured size of the sequence's mode, within this room, for the draft model (0
        when its proposer does not use the model)."""
        return min(spec.configured_size, self.limit(spec)) if spec.uses_model else 0

    def ngram_cap(self, spec: SpecParams) -> int:
        """The most n-gram nodes worth adding: the configured size, within this room and what
        lookup offers (a chain takes the first continuation, a tree every branch)."""
        if not self.ngram:
            return 0
        offered = len(self.ngram[0]) if spec.mode is SpecMode.CHAIN else sum(map(len, self.ngram))
        return min(spec.configured_size, self.limit(spec), offered)


@dataclass(frozen=True)
class StepPlan:
    sizes: list[int]  # per sequence: the draft model's tokens (chain) or nodes (tree); 0 = none
    stop_drafting: StopDrafting | None = None  # chains: asked with each next-token distribution
    basis: object = None  # what the policy that made the plan needs back in ``observe``
    ngram: Sequence[int] = ()  # per sequence: n-gram nodes it may add (continuations cut to it); () = none


def ngram_sizes(seqs: Sequence[PolicySequence], rooms: Sequence[Room]) -> list[int]:
    """Every n-gram node lookup offers, within each sequence's configured size and room: n-gram
    nodes cost no draft pass, so the policies that do not price them take them all."""
    return [r.ngram_cap(s.spec) for s, r in zip(seqs, rooms)]


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
    drafted: list[int]  # per sequence: depth of the draft model's draft sent to verification (0: none)
    accepted: list[int]  # per sequence: of the draft model's tokens, those accepted
    emitted: int  # tokens the step committed, over all sequences
    verify_tokens: int  # nodes in the target pass, roots included
    draft_passes: list[int]  # tokens of each draft pass, in order
    seconds: StepSeconds
    # per sequence: the n-gram's longest continuation offered to verification (0: none) and how
    # many of its tokens the target emitted in order, as if it had drafted alone
    ngram: Sequence[tuple[int, int]] = ()

    @property
    def speculated(self) -> bool:
        return any(self.drafted) or any(d for d, _ in self.ngram)


class Policy:
    """``none``: the configured sizes. Subclasses override ``plan`` and ``observe``."""

    name = "none"

    def plan(self, seqs: Sequence[PolicySequence], rooms: Sequence[Room]) -> StepPlan:
        return StepPlan([r.cap(s.spec) for s, r in zip(seqs, rooms)], ngram=ngram_sizes(seqs, rooms))

    def observe(self, report: StepReport) -> None:
        pass

    def calibrate(self, measure: MeasurePass) -> None:
        """Learn the pair's pass costs at start-up (only the cost policy uses them)."""
