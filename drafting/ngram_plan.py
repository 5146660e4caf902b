"""The n-gram part of the cost policy's chain plans: how many tokens of what lookup offers to verify.

An n-gram node costs no draft pass, only one more token in the verify pass: the slope of the
verify line (drafting/costs.py), scaled like the rest of the step by what the clock measured.
What it buys is the chance that the step gets further than the draft model's chain would: with
``m_j`` the chance that the model's chain (of the plan's size) is accepted through depth j and
``n_j`` that the n-gram continuation is, taken as independent,

    extra expected tokens of a continuation of h tokens = sum_{j<=h} n_j (1 - m_j)

(``m_j = 0`` past the model's chain, and for a sequence that drafts by n-gram alone). Per
sequence, h is the length that most raises the step's expected tokens per second, 0 when none
does; the cost policy scores every plan of model sizes with its best n-gram lengths, so "n-gram
only" (every model size 0, no draft pass at all), "both", "model only" and "none" compete on one
measure. ``n_j`` comes from each sequence's own n-gram acceptance (drafting/acceptance.py), observed
as if the n-gram had drafted alone (the step's emitted tokens against the continuation: a point
mass on x is accepted exactly when the target's draw is x), seeded from all sequences' and
relaxed toward it while the sequence is offered continuations it does not take.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Sequence

from hedgerow.drafting.acceptance import AcceptanceStats
from hedgerow.drafting.plan import PolicySequence, Room, StepReport
from hedgerow.drafting.spec import SpecMode


@dataclass(frozen=True)
class NgramOptions:
    """What lookup offers a batch of chains this step: per sequence ``reach[h - 1]``, the chance
    that the first h tokens of its continuation are accepted (empty: nothing offered)."""

    reach: list[list[float]]

    def add(self, expected: Sequence[list[float]], gammas: Sequence[int], tokens: float, seconds: float,
            price: float) -> tuple[float, float, list[int]]:
        """The plan's expected tokens and seconds with each sequence's best continuation length
        added, and those lengths. ``expected[i][g]``: expected tokens of the model's chain of g
        draft tokens (its increments are the m_j); ``price``: seconds per verify token."""
        lengths = []
        for e, g, reach in zip(expected, gammas, self.reach):
            best, gain, best_gain = 0, 0.0, 0.0
            rate = tokens / max(seconds, 1e-12)
            for h, n in enumerate(reach, 1):
                gain += n * (1.0 - (e[h] - e[h - 1] if h <= g else 0.0))
                if (tokens + gain) / max(seconds + h * price, 1e-12) > rate * (1 + 1e-6):
                    best, best_gain, rate = h, gain, (tokens + gain) / max(seconds + h * price, 1e-12)
            tokens, seconds = tokens + best_gain, seconds + best * price
            lengths.append(best)
        return tokens, seconds, lengths


NO_NGRAM = NgramOptions([])  # ``add`` over no sequences changes nothing


class NgramPricing:
    """Per-sequence n-gram acceptance, and the options it gives a step's plan."""

    def __init__(self, positions: int, prior: float = 0.5, relax: float = 0.1):
        self.pair = AcceptanceStats(positions, prior=prior, decay=0.98)
        self.relax = relax
        self._seqs: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # sequence -> AcceptanceStats

    def _stats(self, seq) -> AcceptanceStats:
        if seq not in self._seqs:
            self._seqs[seq] = self.pair.copy(decay=0.9)
        return self._seqs[seq]

    def options(self, seqs: Sequence[PolicySequence], rooms: Sequence[Room], most: int) -> NgramOptions:
        """The continuation each sequence is offered, up to ``most`` tokens, priced by its acceptance."""
        reach = []
        for s, room in zip(seqs, rooms):
            out, run = [], 1.0
            for rate in self._stats(s).rates()[: min(most, room.ngram_cap(s.spec))]:
                run *= rate
                out.append(run)
            reach.append(out)
        return NgramOptions(reach)

    def chosen(self, seqs: Sequence[PolicySequence], options: NgramOptions, lengths: Sequence[int]) -> None:
        """A sequence offered a continuation it does not take observes nothing this step: its
        estimate relaxes toward all sequences', so one bad stretch does not rule n-grams out for good."""
        for s, reach, h in zip(seqs, options.reach, lengths):
            if reach and h == 0:
                self._stats(s).relax(self.pair, self.relax)

    def observe(self, report: StepReport) -> None:
        """Chains only: a tree's several branches are no sample of one continuation."""
        for s, (drafted, accepted) in zip(report.seqs, report.ngram):
            if drafted and s.spec.mode is SpecMode.CHAIN:
                self._stats(s).observe(drafted, accepted)
                self.pair.observe(drafted, accepted)
