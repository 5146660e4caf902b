"""Draft-length policies: how many draft tokens (chain gamma, or tree nodes) each sequence gets.

- ``none``: the request's configured gamma / tree budget, every step.
- ``heuristic``: transformers' schedule: +2 after a step that accepted everything, else -1 (min 1).
- ``confidence``: draft up to the configured gamma but stop a chain early where the draft's top
  probability falls under ``min_confidence`` or its entropy rises over ``max_entropy``
  (applied inside the chain proposer through ``stop_drafting``).
- ``cost`` (default): each step, per sequence, the gamma that maximises expected tokens per second
  from (a) the running per-position acceptance of that sequence, seeded by the global one, and
  (b) a linear cost model of a verify pass of n tokens and a draft pass of n tokens, calibrated at
  start-up and refitted online from measured step times. Gamma 0 (plain decoding) wins whenever
  speculation does not pay: a poor draft, a verify pass that costs too much, a large batch.
  The model is held to the clock: per batch-size bucket, the measured / predicted seconds of
  steps that drafted and of plain steps scale its predictions (whatever the linear costs leave
  out: commit, streaming, threads contending for cores). Trees (whose cost is not modelled)
  compare the measured tokens/s of tree and plain steps instead (drafting/arms.py).

Every policy only decides *how much* to draft, before the tokens are drawn (or, for
``confidence``, whether a kept token gets a successor), so all of them stay lossless.

Expected tokens of a chain with per-position acceptance a_1..a_g (algorithms.md §8):
    E(g) = 1 + sum_{i=1..g} prod_{j<=i} a_j
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol, Sequence

import torch

from hedgerow.drafting.arms import MeasuredArms

POLICIES = ("none", "heuristic", "confidence", "cost")


class PolicySequence(Protocol):
    request_id: str
    policy_state: dict


@dataclass
class LinearCost:
    """t(n) = a + b * n seconds.

    ``fit`` takes the slope and intercept from calibration points spread over n. Online,
    ``observe`` moves only the intercept: serving observes almost only small n (one or a few
    tokens per sequence), from which a slope cannot be told from noise, while the marginal cost
    of a token is a property of the hardware that calibration measured.
    """

    a: float = 0.0
    b: float = 0.0
    decay: float = 0.9  # per observation: rarely observed costs (the draft while not drafting) must still move

    def fit(self, points: Sequence[tuple[float, float]]) -> None:
        n = [p[0] for p in points]
        t = [p[1] for p in points]
        mn, mt = sum(n) / len(n), sum(t) / len(t)
        var = sum((x - mn) ** 2 for x in n)
        self.b = max(sum((x - mn) * (y - mt) for x, y in zip(n, t)) / var, 0.0) if var > 0 else 0.0
        self.a = max(mt - self.b * mn, 0.0)

    def observe(self, n: float, t: float) -> None:
        self.a = max(self.decay * self.a + (1 - self.decay) * (t - self.b * n), 0.0)

    def __call__(self, n: float) -> float:
        return self.a + self.b * n


class AcceptanceStats:
    """Per-position acceptance a_i = P(position i accepted | position i-1 accepted), as EMAs.

    ``weight[i]`` is the share of ``hits[i]`` that observations make up (1 - decay^n after n);
    the rest is the prior. ``rates`` replaces that prior share by the estimate of the position
    before: a position the policy has rarely drafted is assumed to behave like the one before it
    (deeper positions usually accept at least as often), rather than like a fixed prior that would
    keep the policy from ever drafting there and finding out.
    """

    def __init__(self, positions: int, prior: float = 0.6, decay: float = 0.9):
        self.hits = [prior] * positions
        self.weight = [0.0] * positions
        self.prior = prior
        self.decay = decay

    def observe(self, drafted: int, accepted: int) -> None:
        # positions 1..accepted were accepted; accepted+1 (if drafted) was rejected
        for i in range(min(drafted, accepted + 1, len(self.hits))):
            hit = 1.0 if i < accepted else 0.0
            self.hits[i] = self.decay * self.hits[i] + (1 - self.decay) * hit
            self.weight[i] = self.decay * self.weight[i] + (1 - self.decay)

    def relax(self, toward: "AcceptanceStats", rate: float) -> None:
        """Move a fraction ``rate`` of the way to ``toward``: a sequence that stopped drafting
        observes nothing, so without this one bad stretch would keep it from drafting for good."""
        for i in range(len(self.hits)):
            self.hits[i] += rate * (toward.hits[i] - self.hits[i])
            self.weight[i] += rate * (toward.weight[i] - self.weight[i])

    def rates(self) -> list[float]:
        out, prev = [], self.prior
        for h, w in zip(self.hits, self.weight):
            prev = h + (1.0 - w) * (prev - self.prior)
            out.append(min(max(prev, 0.0), 1.0))
        return out

    def expected_tokens(self, gamma: int) -> float:
        return self.expected_prefix(gamma)[gamma]

    def expected_prefix(self, gamma: int) -> list[float]:
        """[E(0), E(1), ..., E(gamma)] (positions past the tracked ones count as never accepted)."""
        out, run = [1.0], 1.0
        rates = self.rates()
        for i in range(gamma):
            run *= rates[i] if i < len(rates) else 0.0
            out.append(out[-1] + run)
        return out


class Policy:
    """Base: the configured budget. Subclasses override ``plan`` and ``observe``."""

    name = "none"

    def plan(self, seqs: Sequence[PolicySequence], configured: Sequence[int], limits: Sequence[int]) -> list[int]:
        return [min(c, l) for c, l in zip(configured, limits)]

    def observe(self, seq: PolicySequence, drafted: int, accepted: int) -> None:
        pass

    def observe_step(self, verify_tokens: int, verify_seconds: float, draft_passes: Sequence[int],
                     draft_seconds: float) -> None:
        pass

    def stop_drafting(self, probs: torch.Tensor) -> bool:
        """Chain proposers ask this with the next token's distribution before drafting it."""
        return False

    def plan_trees(self, seqs: Sequence[PolicySequence], configured: Sequence[int], limits: Sequence[int]) -> list[int]:
        """Tree budgets; by default the same rule as chains."""
        return self.plan(seqs, configured, limits)

    def start_step(self) -> None:
        """A step's planning begins (before ``plan`` / ``plan_trees``)."""

    def observe_rate(self, speculated: bool, tokens: int, seconds: float) -> None:
        """Tokens emitted and seconds spent (draft + verify + commit) by the whole step that was
        planned last, and whether it drafted anything."""


class HeuristicPolicy(Policy):
    name = "heuristic"

    def plan(self, seqs, configured, limits):
        out = []
        for s, c, l in zip(seqs, configured, limits):
            g = s.policy_state.setdefault("gamma", c)
            out.append(min(g, l))
        return out

    def observe(self, seq, drafted, accepted):
        if drafted == 0:
            return
        g = seq.policy_state.get("gamma", drafted)
        seq.policy_state["gamma"] = g + 2 if accepted == drafted else max(1, g - 1)


class ConfidencePolicy(Policy):
    name = "confidence"

    def __init__(self, min_confidence: float = 0.4, max_entropy: float = 2.5):
        self.min_confidence = min_confidence
        self.max_entropy = max_entropy

    def stop_drafting(self, probs: torch.Tensor) -> bool:
        top = float(probs.max())
        entropy = float(-(probs * torch.log(probs.clamp(min=1e-30))).sum())
        return top < self.min_confidence or entropy > self.max_entropy


def batch_bucket(n: int) -> int:
    """Batch sizes that share measured step-time scales: round(log2 n), so 1 | 2 | 3-5 | 6-11 | 12-22 | 23-45 ...
    (a server at 16 clients runs 14-16 sequences: one bucket, not two that take turns)."""
    return round(math.log2(max(n, 1)))


class CostPolicy(Policy):
    """Maximise expected tokens per second of the whole step."""

    name = "cost"

    def __init__(self, max_gamma: int = 16, probe_every: int = 32, relax: float = 0.1, probe_steps: int = 3):
        self.verify = LinearCost()  # one target pass over n tokens
        self.draft = LinearCost()  # one draft pass over n tokens (calibrated)
        self.catch_up = LinearCost()  # the draft phase's first pass and fixed costs (learned online)
        # the pair's acceptance over all sequences: slower than a sequence's own, which relaxes
        # toward it while the sequence is not drafting
        self.global_stats = AcceptanceStats(max_gamma, decay=0.98)
        self.max_gamma = max_gamma
        self.probe_every = probe_every
        self.relax = relax
        self.steps = 0
        # the model against the clock, per batch-size bucket: measured / predicted seconds of steps
        # that drafted and of plain steps (commit, scheduling, streaming, threads contending: all
        # that the two linear costs leave out); a plain step runs now and then to keep its scale
        # measured while speculation wins
        self.scale: dict[int, dict[bool, float | None]] = {}  # None: not measured yet (1.0)
        self.scale_decay = 0.9
        self.scale_relax = 0.005  # per step and per sequence, toward 1.0, of the kind of step not taken
        self.plain_every = 64  # at most this many steps between plain steps; 8 at first, doubling
        self._plain_gap: dict[int, int] = {}
        self._last_plain: dict[int, int] = {}
        self._predicted: tuple[dict[bool, float], bool, float] | None = None
        # trees: whether to speculate is measured, not modelled (a tree step's cost, its
        # construction included, is measured rather than modelled; drafting/arms.py)
        self.probe_steps = probe_steps
        self.tree_arms: MeasuredArms | None = None  # made at the first tree step
        self._used: list[MeasuredArms] = []  # the arms that chose this step's plan

    def calibrated(self) -> bool:
        return self.verify.a + self.verify.b > 0

    def _stats(self, seq) -> AcceptanceStats:
        if "acceptance" not in seq.policy_state:
            stats = AcceptanceStats(self.max_gamma)
            stats.hits = list(self.global_stats.hits)
            stats.weight = list(self.global_stats.weight)
            seq.policy_state["acceptance"] = stats
        return seq.policy_state["acceptance"]

    def step_time(self, gammas: Sequence[int]) -> float:
        """Predicted seconds of one step: draft passes (catch-up + gamma - 1 more) + one verify."""
        t = self.verify(sum(g + 1 for g in gammas))
        live = [g for g in gammas if g > 0]
        if live:
            t += self.catch_up(2 * len(live))  # usually 1-2 tokens per sequence
            for i in range(1, max(live)):
                t += self.draft(sum(1 for g in live if g > i))
        return t

    def plan(self, seqs, configured, limits):
        """The model's plan, its step times scaled by what this batch size has measured."""
        self.steps += 1
        caps = [min(self.max_gamma, c, l) for c, l in zip(configured, limits)]
        bucket = batch_bucket(len(seqs))
        scale = self.scale.setdefault(bucket, {True: None, False: None})
        gammas = self.model_plan(seqs, caps, scale)
        probe = None
        if self.steps % self.probe_every == 0:
            # keep acceptance estimates alive where drafting stopped: the sequence that has gone
            # longest without drafting drafts one token (one, so that a large batch that stopped
            # for cost does not pay every sequence's catch-up at once)
            idle = [i for i, (g, cap) in enumerate(zip(gammas, caps)) if g == 0 and cap > 0]
            if idle:
                probe = min(idle, key=lambda i: seqs[i].policy_state.get("drafted_at", 0))
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
        # a probe step is no sample of the plan's cost (its catch-up is a switch's)
        self._predicted = None if probe is not None else (scale, drafting, self.step_time(gammas))
        for s, g in zip(seqs, gammas):
            if g == 0:
                self._stats(s).relax(self.global_stats, self.relax)
            else:
                s.policy_state["drafted_at"] = self.steps
        return gammas

    def model_plan(self, seqs, caps: Sequence[int], scale: dict[bool, float] | None = None) -> list[int]:
        """Scan one gamma shared by the batch (expected tokens are not concave in gamma: gamma 1 can
        lose to plain decoding while gamma 4 wins), then move single sequences by +-1 while the
        predicted tokens per second of the whole step improve. ``scale``: measured / predicted
        seconds of drafting and of plain steps."""
        expected = [self._stats(s).expected_prefix(cap) for s, cap in zip(seqs, caps)]
        scale = {k: 1.0 if v is None else v for k, v in (scale or {}).items()} or {True: 1.0, False: 1.0}

        def rate(gammas: list[int]) -> float:
            seconds = self.step_time(gammas) * scale[any(gammas)]
            return sum(e[g] for e, g in zip(expected, gammas)) / max(seconds, 1e-9)

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

    def observe(self, seq, drafted, accepted):
        if drafted:
            self._stats(seq).observe(drafted, accepted)
            self.global_stats.observe(drafted, accepted)

    def plan_trees(self, seqs, configured, limits):
        """Trees: the configured budget or plain decoding, whichever has measured more tokens per
        second (MeasuredArms: the other arm is probed now and then; a switch step counts for neither)."""
        if self.tree_arms is None:
            self.tree_arms = MeasuredArms(self.probe_every, self.probe_steps)
        self._used.append(self.tree_arms)
        on = self.tree_arms.choose()
        return [min(c, l) if on else 0 for c, l in zip(configured, limits)]

    def start_step(self):
        self._used = []
        self._predicted = None

    def observe_rate(self, speculated, tokens, seconds):
        for arms in self._used:
            arms.observe(speculated, tokens, seconds)
        self._used = []
        if self._predicted is not None:
            scale, planned, predicted = self._predicted
            self._predicted = None
            if planned == speculated and predicted > 0:  # not when every chain stopped before drafting
                d, old = self.scale_decay, scale[speculated]
                scale[speculated] = seconds / predicted if old is None else d * old + (1 - d) * seconds / predicted

    def observe_step(self, verify_tokens, verify_seconds, draft_passes, draft_seconds):
        self.verify.observe(verify_tokens, verify_seconds)
        if draft_passes:
            # the drafting passes after the first cost what calibration measured; the rest of the
            # phase (the catch-up pass and the proposer's own work) is the catch-up cost
            rest = draft_seconds - sum(self.draft(n) for n in draft_passes[1:])
            self.catch_up.observe(draft_passes[0], max(rest, 0.0))


def make_policy(name: str) -> Policy:
    if name == "none":
        return Policy()
    if name == "heuristic":
        return HeuristicPolicy()
    if name == "confidence":
        return ConfidencePolicy()
    if name == "cost":
        return CostPolicy()
    raise ValueError(f"adaptive policy must be one of {', '.join(POLICIES)}, got {name!r}")
