"""The cost policy (the default): each step, the draft size that maximises expected tokens per second.

Chains: per sequence, the running per-position acceptance (drafting/acceptance.py), seeded by the
pair's, and the linear cost model of draft and verify passes (drafting/costs.py) give the
expected tokens per second of every choice of sizes; the best wins, and 0 (plain decoding)
whenever speculation does not pay: a poor draft, a verify pass that costs too much, a large
batch. The model is held to the clock: per batch-size bucket, the measured / predicted seconds of
steps that drafted and of plain steps scale its predictions (whatever the linear costs leave out:
commit, streaming, threads contending for cores). A plain step runs now and then to keep that
figure fresh while speculation wins.

N-gram nodes (drafting/ngram_plan.py) cost no draft pass, only their verify tokens: every plan of
model sizes is scored with each sequence's best n-gram continuation length, priced by the verify
line's slope, so model drafts, n-gram drafts, both or none win per measured tokens per second.

Trees, whose cost is not modelled, compare the measured tokens per second of tree and plain steps
instead (drafting/arms.py); a tree step takes the n-gram nodes lookup offers.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Sequence

from hedgerow.drafting.acceptance import AcceptanceStats
from hedgerow.drafting.arms import MeasuredArms
from hedgerow.drafting.costs import OUTLIER, CostModel, MeasurePass, batch_bucket
from hedgerow.drafting.ngram_plan import NO_NGRAM, NgramOptions, NgramPricing
from hedgerow.drafting.plan import Policy, StepPlan, StepReport
from hedgerow.drafting.spec import SpecMode


@dataclass
class _SeqState:
    acceptance: AcceptanceStats
    drafted_at: int = 0  # the last step this sequence drafted


@dataclass(frozen=True)
class _ChainBasis:
    """The chains' part of a plan, for ``observe``: the scales it used and what it predicted."""

    scale: dict[bool, float | None]  # the bucket's measured / predicted seconds (updated in place)
    drafting: bool
    predicted: float  # seconds (a keep-alive probe step gets no basis: it is no sample of the plan)


@dataclass(frozen=True)
class _Basis:
    chain: _ChainBasis | None
    trees: bool  # the tree arms chose part of this plan


class CostPolicy(Policy):
    """Maximise expected tokens per second of the whole step."""

    name = "cost"

    def __init__(
        self,
        costs: CostModel | None = None,
        *,
        max_draft_tokens: int = 16,
        probe_every: int = 32,
        probe_steps: int = 3,
        relax: float = 0.1,
        acceptance_prior: float = 0.8,
    ):
        self.costs = costs if costs is not None else CostModel()
        # the pair's acceptance over all sequences: slower than a sequence's own, which relaxes
        # toward it while the sequence is not drafting. Its prior is optimistic: a pair starts out
        # drafting and learns its real rate from the first steps (a pessimistic prior would keep a
        # good pair from ever drafting enough to find out; a bad pair costs a few steps)
        self.pair_acceptance = AcceptanceStats(max_draft_tokens, prior=acceptance_prior, decay=0.98, prior_strength=8)
        self.max_draft_tokens = max_draft_tokens
        self.probe_every = probe_every
        self.relax = relax
        self.steps = 0
        self._seqs: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # sequence -> _SeqState
        # the model against the clock, per batch-size bucket (None: not measured yet, 1.0)
        self._scale: dict[int, dict[bool, float | None]] = {}
        self.scale_decay = 0.9
        self.scale_relax = 0.005  # per step and per sequence, toward 1.0, of the kind of step not taken
        self.plain_every = 64  # at most this many steps between plain steps; 8 at first, doubling
        self._plain_gap: dict[int, int] = {}
        self._last_plain: dict[int, int] = {}
        self.tree_arms = MeasuredArms(probe_every, probe_steps)
        self.ngram = NgramPricing(max_draft_tokens)

    def calibrate(self, measure: MeasurePass) -> None:
        self.costs.calibrate(measure)

    def clock_scale(self, batch_size: int) -> dict[bool, float | None]:
        """Measured / predicted seconds of drafting (True) and plain (False) steps at this batch size."""
        return dict(self._scale.get(batch_bucket(batch_size), {True: None, False: None}))

    def _state(self, seq) -> _SeqState:
        if seq not in self._seqs:
            self._seqs[seq] = _SeqState(self.pair_acceptance.copy(decay=0.9))
        return self._seqs[seq]

    # --- plan ---------------------------------------------------------------------------------
    def plan(self, seqs, rooms):
        sizes, ngram = [0] * len(seqs), [0] * len(seqs)
        chains = [i for i, s in enumerate(seqs) if s.spec.mode is SpecMode.CHAIN]
        trees = [i for i, s in enumerate(seqs) if s.spec.mode is SpecMode.TREE]
        chain_basis = None
        if chains:
            caps = [min(self.max_draft_tokens, rooms[i].cap(seqs[i].spec)) for i in chains]
            options = self.ngram.options([seqs[i] for i in chains], [rooms[i] for i in chains], self.max_draft_tokens)
            gammas, lengths, chain_basis = self._plan_chains([seqs[i] for i in chains], caps, options)
            for i, g, h in zip(chains, gammas, lengths):
                sizes[i], ngram[i] = g, h
        if trees and self.tree_arms.choose():
            for i in trees:
                sizes[i], ngram[i] = rooms[i].cap(seqs[i].spec), rooms[i].ngram_cap(seqs[i].spec)
        return StepPlan(sizes, basis=_Basis(chain_basis, bool(trees)), ngram=ngram)

    def _plan_chains(
        self, seqs, caps: list[int], options: NgramOptions
    ) -> tuple[list[int], list[int], _ChainBasis | None]:
        """The model's plan and the n-gram lengths that go with it, its step times scaled by what
        this batch size has measured."""
        self.steps += 1
        bucket = batch_bucket(len(seqs))
        scale = self._scale.setdefault(bucket, {True: None, False: None})
        gammas = self.model_plan(seqs, caps, scale, options)
        probe = None
        if self.steps % self.probe_every == 0:
            # keep acceptance estimates alive where drafting stopped: the sequence that has gone
            # longest without drafting drafts one token (one, so that a large batch that stopped
            # for cost does not pay every sequence's catch-up at once)
            idle = [i for i, (g, cap) in enumerate(zip(gammas, caps)) if g == 0 and cap > 0]
            if idle:
                probe = min(idle, key=lambda i: self._state(seqs[i]).drafted_at)
                gammas[probe] = 1
        else:
            gap = self._plain_gap.setdefault(bucket, 8)
            if any(gammas) and self.steps - self._last_plain.setdefault(bucket, self.steps) >= gap:
                gammas = [0] * len(gammas)  # keep the plain step's scale measured
                self._plain_gap[bucket] = min(self.plain_every, 2 * gap)
        drafting = any(gammas)
        if not drafting:
            self._last_plain[bucket] = self.steps
        # the kind of step not run now relaxes toward the model, so that one bad measurement cannot
        # rule it out for good; the slower the larger the batch, since going back to drafting
        # costs every sequence's catch-up at once
        if scale[not drafting] is not None:
            scale[not drafting] += self.scale_relax / len(seqs) * (1.0 - scale[not drafting])
        for s, g in zip(seqs, gammas):
            if g == 0:
                self._state(s).acceptance.relax(self.pair_acceptance, self.relax)
            else:
                self._state(s).drafted_at = self.steps
        # the n-gram lengths for the final sizes, priced unscaled like the prediction they join
        expected = [self._state(s).acceptance.expected_prefix(cap) for s, cap in zip(seqs, caps)]
        _, predicted, lengths = options.add(expected, gammas, sum(e[g] for e, g in zip(expected, gammas)),
                                            self.costs.step_time(gammas), self.costs.verify.b)
        self.ngram.chosen(seqs, options, lengths)
        # a probe step is no sample of the plan's cost (its catch-up is a switch's)
        basis = None if probe is not None else _ChainBasis(scale, drafting, predicted)
        return gammas, lengths, basis

    def model_plan(self, seqs, caps: Sequence[int], scale: dict[bool, float | None],
                   ngram: NgramOptions = NO_NGRAM) -> list[int]:
        """Scan one size shared by the batch (expected tokens are not concave in the size: 1 draft
        token can lose to plain decoding while 4 win), then move single sequences by +-1 while the
        predicted tokens per second of the whole step, with its best n-gram lengths, improve.
        ``scale``: measured / predicted seconds of drafting and of plain steps."""
        expected = [self._state(s).acceptance.expected_prefix(cap) for s, cap in zip(seqs, caps)]
        factor = {k: 1.0 if v is None else v for k, v in scale.items()}

        def rate(gammas: list[int]) -> float:
            f = factor[any(gammas)]
            tokens, seconds, _ = ngram.add(expected, gammas, sum(e[g] for e, g in zip(expected, gammas)),
                                           self.costs.step_time(gammas) * f, self.costs.verify.b * f)
            return tokens / max(seconds, 1e-9)

        gammas = max(([min(g, c) for c in caps] for g in range(max(caps, default=0) + 1)), key=rate)
        best = rate(gammas)
        improved = True
        while improved:
            improved = False
            for i, cap in enumerate(caps):
                for g in (gammas[i] + 1, gammas[i] - 1):
                    if 0 <= g <= cap:
                        trial = gammas[:i] + [g] + gammas[i + 1 :]
                        r = rate(trial)
                        if r > best * (1 + 1e-6):
                            gammas, best, improved = trial, r, True
                            break
        return gammas

    # --- observe ------------------------------------------------------------------------------
    def observe(self, report: StepReport) -> None:
        for s, drafted, accepted in zip(report.seqs, report.drafted, report.accepted):
            if drafted:
                self._state(s).acceptance.observe(drafted, accepted)
                self.pair_acceptance.observe(drafted, accepted)
        self.ngram.observe(report)
        seconds = report.seconds
        self.costs.observe(report.verify_tokens, seconds.verify, report.draft_passes, seconds.draft)
        basis: _Basis = report.plan.basis or _Basis(None, False)  # a step it did not plan: acceptance and costs only
        if basis.trees:
            self.tree_arms.observe(report.speculated, report.emitted, seconds.total)
        chain = basis.chain
        if chain is not None and chain.drafting == report.speculated and chain.predicted > 0:
            # not when every chain stopped before drafting
            # from 1.0 (the model as calibrated), not from the first sample: a kind of step's first
            # run is often its slowest (cold caches, the first catch-up), and one sample must not
            # rule it out for the many steps it takes the relaxation to bring it back
            d, old = self.scale_decay, chain.scale[chain.drafting]
            ratio = min(seconds.total / chain.predicted, OUTLIER)  # one slow step moves it a bounded way
            chain.scale[chain.drafting] = d * (1.0 if old is None else old) + (1 - d) * ratio
