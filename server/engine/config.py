"""The engine's configuration: a frozen value, validated once."""

from __future__ import annotations

from dataclasses import dataclass

from hedgerow.drafting.policy import POLICIES
from hedgerow.drafting.spec import SpecParams

OVERLAPS = ("none", "pearl", "branch")


@dataclass(frozen=True)
class EngineConfig:
    max_model_len: int = 2048  # prompt + generated tokens per sequence (the KV slot length)
    max_batch_size: int = 16  # sequences decoded together (KV slots per model)
    max_waiting: int = 1024  # queued requests beyond the batch; more are refused
    prefill_chunk: int = 512  # prompt tokens per sequence per prefill pass
    spec: SpecParams = SpecParams()  # default speculation settings of requests that give none
    adaptive: str = "cost"  # draft-size policy: none | heuristic | confidence | cost (drafting/policy.py)
    overlap: str = "none"  # none | pearl | branch: draft hedge branches while the target verifies
    branch_alternatives: int = 2  # alternatives to the last draft token, for overlap=branch
    ngram_pool: int = 0  # entries of the server-wide pool of n-grams from recent outputs (0: none)

    def __post_init__(self) -> None:
        for name in ("max_model_len", "max_batch_size", "prefill_chunk"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.ngram_pool < 0:
            raise ValueError(f"ngram_pool must be >= 0, got {self.ngram_pool}")
        if self.adaptive not in POLICIES:
            raise ValueError(f"adaptive must be one of {', '.join(POLICIES)}, got {self.adaptive!r}")
        if self.overlap not in OVERLAPS:
            raise ValueError(f"overlap must be one of {', '.join(OVERLAPS)}, got {self.overlap!r}")

    @property
    def hedge_alternatives(self) -> int | None:
        """What the proposer hedges while the target verifies (drafting/proposer.py)."""
        return {"none": None, "pearl": 0, "branch": self.branch_alternatives}[self.overlap]
