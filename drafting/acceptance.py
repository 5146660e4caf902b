"""Per-position acceptance of a sequence's drafts, and the expected tokens of a draft it implies.

Expected tokens of a chain of g draft tokens with per-position acceptance a_1..a_g (the target's
own token included; docs/algorithms.md, the expected-speedup model):

    E(g) = 1 + sum_{i=1..g} prod_{j<=i} a_j
"""

from __future__ import annotations


class AcceptanceStats:
    """Per-position acceptance a_i = P(position i accepted | position i-1 accepted), as EMAs.

    ``weight[i]`` is the share of ``hits[i]`` that observations make up (1 - decay^n after n);
    the rest is the prior. ``rates`` replaces that prior share by the estimate of the position
    before: a position the policy has rarely drafted is assumed to behave like the one before it
    (deeper positions usually accept at least as often), rather than like a fixed prior that would
    keep the policy from ever drafting there and finding out.
    """

    def __init__(self, positions: int, prior: float = 0.6, decay: float = 0.9, prior_strength: float = 2.0):
        self.hits = [prior] * positions
        self.weight = [0.0] * positions
        self.seen = [0] * positions  # observations per position
        self.prior = prior
        self.decay = decay
        self.prior_strength = prior_strength  # the prior counts as this many observations

    def copy(self, decay: float) -> "AcceptanceStats":
        """A new estimate that starts where this one is (a sequence starts from the pair's)."""
        out = AcceptanceStats(len(self.hits), self.prior, decay, self.prior_strength)
        out.hits, out.weight, out.seen = list(self.hits), list(self.weight), list(self.seen)
        return out

    def observe(self, drafted: int, accepted: int) -> None:
        # positions 1..accepted were accepted; accepted+1 (if drafted) was rejected
        # the first observations are averaged with the prior (worth ``prior_strength`` of them),
        # then the estimate fades at ``decay``: a few steps undo a wrong prior, and a long run
        # still follows the sequence as its text changes
        for i in range(min(drafted, accepted + 1, len(self.hits))):
            hit = 1.0 if i < accepted else 0.0
            step = max(1 - self.decay, 1 / (self.seen[i] + self.prior_strength + 1))
            self.seen[i] += 1
            self.hits[i] += step * (hit - self.hits[i])
            self.weight[i] += step * (1.0 - self.weight[i])

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

    def expected_prefix(self, n: int) -> list[float]:
        """[E(0), E(1), ..., E(n)] (positions past the tracked ones count as never accepted)."""
        out, run = [1.0], 1.0
        rates = self.rates()
        for i in range(n):
            run *= rates[i] if i < len(rates) else 0.0
            out.append(out[-1] + run)
        return out
