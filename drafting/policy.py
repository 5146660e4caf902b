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

Every policy only decides *how much* to draft, before the tokens are drawn (or, for
``confidence``, whether a kept token gets a successor), so all of them stay lossless.

Expected tokens of a chain with per-position acceptance a_1..a_g (algorithms.md §8):
    E(g) = 1 + sum_{i=1..g} prod_{j<=i} a_j
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, Sequence

import torch

POLICIES = ("none", "heuristic", "confidence", "cost")


class PolicySequence(Protocol):
    request_id: str
    policy_state: dict


@dataclass
class LinearCost:
    """t(n) = a + b * n seconds, fitted by exponentially weighted least squares."""

    a: float = 0.0
    b: float = 0.0
    decay: float = 0.9  # per observation: rarely observed costs (the draft while not drafting) must still move
    _s: list[float] = field(default_factory=lambda: [0.0] * 5)  # w, wn, wnn, wt, wnt

    def observe(self, n: float, t: float) -> None:
        s = self._s
        d = self.decay
        s[:] = [d * s[0] + 1, d * s[1] + n, d * s[2] + n * n, d * s[3] + t, d * s[4] + n * t]
        w, wn, wnn, wt, wnt = s
        det = w * wnn - wn * wn
        if det > 1e-12 * max(1.0, w * wnn):
            b = (w * wnt - wn * wt) / det
            self.b = max(b, 0.0)
            self.a = max((wt - self.b * wn) / w, 0.0)
        elif w > 0:
            self.a = max(wt / w - self.b * wn / w, 0.0)

    def __call__(self, n: float) -> float:
        return self.a + self.b * n


class AcceptanceStats:
    """Per-position acceptance a_i = P(position i accepted | position i-1 accepted), as EMAs."""

    def __init__(self, positions: int, prior: float = 0.6, decay: float = 0.9):
        self.hits = [prior] * positions
        self.decay = decay

    def observe(self, drafted: int, accepted: int) -> None:
        # positions 1..accepted were accepted; accepted+1 (if drafted) was rejected
        for i in range(min(drafted, accepted + 1)):
            if i >= len(self.hits):
                break
            hit = 1.0 if i < accepted else 0.0
            self.hits[i] = self.decay * self.hits[i] + (1 - self.decay) * hit

    def expected_tokens(self, gamma: int) -> float:
        total, run = 1.0, 1.0
        for i in range(min(gamma, len(self.hits))):
            run *= self.hits[i]
            total += run
        return total


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


class CostPolicy(Policy):
    """Maximise expected tokens per second of the whole step."""

    name = "cost"

    def __init__(self, max_gamma: int = 16, probe_every: int = 32):
        self.verify = LinearCost()
        self.draft = LinearCost()
        self.global_stats = AcceptanceStats(max_gamma)
        self.max_gamma = max_gamma
        self.probe_every = probe_every
        self.steps = 0

    def calibrated(self) -> bool:
        return self.verify.a + self.verify.b > 0

    def _stats(self, seq) -> AcceptanceStats:
        if "acceptance" not in seq.policy_state:
            stats = AcceptanceStats(self.max_gamma)
            stats.hits = list(self.global_stats.hits)
            seq.policy_state["acceptance"] = stats
        return seq.policy_state["acceptance"]

    def step_time(self, gammas: Sequence[int]) -> float:
        """Predicted seconds of one step: draft passes (catch-up + gamma - 1 more) + one verify."""
        t = self.verify(sum(g + 1 for g in gammas))
        live = [g for g in gammas if g > 0]
        if live:
            t += self.draft(2 * len(live))  # catch-up: usually 1-2 tokens per sequence
            for i in range(1, max(live)):
                t += self.draft(sum(1 for g in live if g > i))
        return t

    def plan(self, seqs, configured, limits):
        self.steps += 1
        caps = [min(self.max_gamma, c, l) for c, l in zip(configured, limits)]
        stats = [self._stats(s) for s in seqs]
        gammas = [0] * len(seqs)
        best = sum(st.expected_tokens(0) for st in stats) / max(self.step_time(gammas), 1e-9)
        while True:  # greedy ascent: one more draft token where it helps throughput most
            choice, choice_rate = None, best
            for i, cap in enumerate(caps):
                if gammas[i] >= cap:
                    continue
                gammas[i] += 1
                rate = sum(st.expected_tokens(g) for st, g in zip(stats, gammas)) / max(self.step_time(gammas), 1e-9)
                gammas[i] -= 1
                if rate > choice_rate * (1 + 1e-6):
                    choice, choice_rate = i, rate
            if choice is None:
                break
            gammas[choice] += 1
            best = choice_rate
        if self.steps % self.probe_every == 0:  # keep acceptance estimates alive where we stopped drafting
            gammas = [max(g, min(1, cap)) for g, cap in zip(gammas, caps)]
        return gammas

    def observe(self, seq, drafted, accepted):
        if drafted:
            self._stats(seq).observe(drafted, accepted)
            self.global_stats.observe(drafted, accepted)

    def observe_step(self, verify_tokens, verify_seconds, draft_passes, draft_seconds):
        self.verify.observe(verify_tokens, verify_seconds)
        if draft_passes:
            # split the measured draft time over its passes in proportion to the model's prediction
            pred = [max(self.draft(n), 1e-9) for n in draft_passes]
            scale = draft_seconds / sum(pred) if self.draft.a + self.draft.b > 0 else None
            for n, p in zip(draft_passes, pred):
                self.draft.observe(n, p * scale if scale else draft_seconds / len(draft_passes))


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

