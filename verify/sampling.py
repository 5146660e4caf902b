"""Sampling parameters and the one warping function shared by target and draft.

Plain decoding samples from ``warp(logits)``; speculative verification compares the draft's
proposals against exactly the same ``warp(logits)`` of the target, so every mode samples from
the same distribution. Greedy decoding is ``temperature == 0`` and yields a one-hot
distribution at ``argmax`` (first index on ties, as ``torch.argmax`` and transformers do).
A positive temperature under ``GREEDY_BELOW`` is greedy too: it is the limit such temperatures
converge to, reached exactly in float32 (docs/algorithms.md §1.3). Logits are shifted by their
maximum before the division, so no positive temperature overflows them.

Order of operations (as transformers' default processors): temperature, then top-k, then top-p.
- top-k keeps the k highest logits; ties at the boundary are broken by token id (stable sort).
- top-p keeps the smallest prefix of the descending order whose probability mass reaches p:
  a token is dropped when the mass strictly before it is already >= p. The top token is always kept.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# float32's smallest normal number, 2**-126: temperatures below it are greedy (docs/algorithms.md §1.3)
GREEDY_BELOW = 2.0**-126


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling settings. ``temperature == 0`` (or under ``GREEDY_BELOW``) is greedy and
    always legal."""

    temperature: float = 0.0
    top_k: int = 0  # 0 disables top-k
    top_p: float = 1.0  # 1.0 disables top-p
    seed: int | None = None

    def __post_init__(self) -> None:
        if not (self.temperature >= 0.0) or self.temperature == float("inf"):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.seed is not None and not (0 <= self.seed < 2**63):
            raise ValueError(f"seed must be in [0, 2**63), got {self.seed}")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW


def warp_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Return the fp32 distribution plain decoding samples from. ``logits``: [..., vocab]."""
    logits = logits.float()
    if params.greedy:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    scaled = (logits - logits.amax(-1, keepdim=True)) / params.temperature  # <= 0: never overflows
    vocab = scaled.shape[-1]
    if params.top_k == 0 and params.top_p >= 1.0:
        return torch.softmax(scaled, dim=-1)
    sorted_logits, order = torch.sort(scaled, dim=-1, descending=True, stable=True)
    if 0 < params.top_k < vocab:
        sorted_logits[..., params.top_k:] = float("-inf")
    if params.top_p < 1.0:
        sorted_probs = torch.softmax(sorted_logits, dim=-1)
        mass_before = sorted_probs.cumsum(-1) - sorted_probs  # [..., vocab]
        drop = mass_before >= params.top_p
        drop[..., 0] = False
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    probs_sorted = torch.softmax(sorted_logits, dim=-1)
    return torch.empty_like(probs_sorted).scatter_(-1, order, probs_sorted)


def sample(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Draw one token per row of ``probs`` [..., vocab] by the exponential race.

    ``argmax(p / E)`` with ``E ~ Exp(1)`` i.i.d. picks token i with probability ``p_i / sum(p)``,
    needs no normalisation and no host sync (gpt-fast's ``multinomial_sample_one_no_sync``).
    """
    noise = torch.empty_like(probs).exponential_(generator=generator)
    return (probs / noise).argmax(-1)
