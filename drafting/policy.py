"""Draft-size policies: how many draft tokens (chain) or tree nodes each sequence gets this step.

- ``none``: the request's configured size, every step (drafting/plan.py).
- ``heuristic``: transformers' schedule: +2 after a step that accepted everything, else -1 (min 1).
- ``confidence``: draft up to the configured size but stop a chain early where the draft's top
  probability falls under ``min_confidence`` or its entropy rises over ``max_entropy``.
- ``cost`` (default; drafting/cost_policy.py): the size that maximises expected tokens per second,
  0 (plain decoding) when speculation does not pay.

Every policy plans the draft model's sizes; n-gram nodes, which cost no draft pass, are taken as
lookup offers them (``ngram_sizes``), except under ``cost``, which prices them too.

Every policy only decides *how much* to draft, before the tokens are drawn (or, for
``confidence``, whether a kept token gets a successor), so all of them stay lossless.
"""

from __future__ import annotations

import weakref

import torch

from hedgerow.drafting.cost_policy import CostPolicy
from hedgerow.drafting.plan import Policy, StepPlan, ngram_sizes

POLICIES = ("none", "heuristic", "confidence", "cost")


class HeuristicPolicy(Policy):
    name = "heuristic"

    def __init__(self) -> None:
        self._size: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # sequence -> current size

    def plan(self, seqs, rooms):
        sizes = []
        for s, r in zip(seqs, rooms):
            size = min(self._size.setdefault(s, s.spec.configured_size), r.limit(s.spec))
            sizes.append(size if s.spec.uses_model else 0)
        return StepPlan(sizes, ngram=ngram_sizes(seqs, rooms))

    def observe(self, report):
        for s, drafted, accepted in zip(report.seqs, report.drafted, report.accepted):
            if drafted:
                size = self._size.get(s, drafted)
                self._size[s] = size + 2 if accepted == drafted else max(1, size - 1)


class ConfidencePolicy(Policy):
    name = "confidence"

    def __init__(self, min_confidence: float = 0.4, max_entropy: float = 2.5):
        self.min_confidence = min_confidence
        self.max_entropy = max_entropy

    def plan(self, seqs, rooms):
        base = super().plan(seqs, rooms)
        return StepPlan(base.sizes, stop_drafting=self.unsure, ngram=base.ngram)

    def unsure(self, probs: torch.Tensor) -> bool:
        top = float(probs.max())
        entropy = float(-(probs * torch.log(probs.clamp(min=1e-30))).sum())
        return top < self.min_confidence or entropy > self.max_entropy


def make_policy(name: str) -> Policy:
    policies = {"none": Policy, "heuristic": HeuristicPolicy, "confidence": ConfidencePolicy, "cost": CostPolicy}
    if name not in policies:
        raise ValueError(f"adaptive policy must be one of {', '.join(POLICIES)}, got {name!r}")
    return policies[name]()
