"""Requests and the per-sequence state the engine keeps between steps.

Length bookkeeping (the invariant every step keeps):
- ``tokens`` = prompt + generated tokens, all committed.
- the target's KV slot holds rows for ``tokens[:target_len]`` with ``target_len == len(tokens) - 1``:
  the last committed token is the next tree's root and its KV is computed by the next verify pass.
- the draft's slot holds rows for ``tokens[:draft_len]``; the draft may lag (it catches up first
  thing in its next proposal).
"""

from __future__ import annotations

import enum
import secrets
from collections import Counter
from dataclasses import dataclass, field

import torch

from hedgerow.drafting.spec import SpecMode, SpecParams
from hedgerow.verify.sampling import SamplingParams


class FinishReason(str, enum.Enum):
    EOS = "eos"
    LENGTH = "length"
    STOP = "stop"
    ABORT = "abort"
    ERROR = "error"


@dataclass(frozen=True)
class Request:
    request_id: str
    prompt_ids: tuple[int, ...]
    sampling: SamplingParams = SamplingParams()
    max_new_tokens: int = 128
    spec: SpecParams | None = None  # None: the engine's default
    ignore_eos: bool = False
    stop_token_ids: tuple[int, ...] = ()  # also end the request (FinishReason.STOP), kept in the output
    min_tokens: int = 0  # EOS (unless ignore_eos) and stop_token_ids are masked out before this many new tokens
    logprobs: int | None = None  # None: none; k: each token's logprob and its top k alternatives (k <= 20)
    # another request of the same prompt (a sample of the same n): once its prompt is prefilled, this
    # one's KV slots copy its prompt rows instead of computing them (Engine._prefill); a hint only
    fork_of: str | None = None


@dataclass(frozen=True)
class ProposerCounts:
    """One proposer's draft tokens sent to verification, and of them the accepted ones (kept:
    never past EOS or the length limit). Each draft node belongs to the proposer that put it in
    the tree, so the counts of ``model`` and ``ngram`` add up to a step's or a request's."""

    draft_tokens: int = 0
    accepted_tokens: int = 0

    def __add__(self, other: "ProposerCounts") -> "ProposerCounts":
        return ProposerCounts(self.draft_tokens + other.draft_tokens, self.accepted_tokens + other.accepted_tokens)

    def as_dict(self) -> dict:
        rate = self.accepted_tokens / self.draft_tokens if self.draft_tokens else 0.0
        return {"draft_tokens": self.draft_tokens, "accepted_tokens": self.accepted_tokens,
                "acceptance_rate": round(rate, 4)}


@dataclass
class SeqStats:
    verify_steps: int = 0
    draft_tokens: int = 0  # draft tokens sent to verification
    accepted_tokens: int = 0  # draft tokens accepted and kept (never past EOS or the length limit)
    emitted_per_step: Counter = field(default_factory=Counter)  # tokens kept per verify step, bonus included
    rollback_tokens: int = 0  # drafted tokens thrown away: rejected drafts and hedge branches that missed
    branches: int = 0  # hedge branches drafted while the target verified
    branch_hits: int = 0  # of which came true
    proposers: dict[str, ProposerCounts] = field(default_factory=dict)  # "model", "ngram": those that drafted

    @property
    def acceptance_rate(self) -> float:
        return self.accepted_tokens / self.draft_tokens if self.draft_tokens else 0.0

    @property
    def mean_accepted_length(self) -> float:
        steps = sum(self.emitted_per_step.values())
        return sum(k * v for k, v in self.emitted_per_step.items()) / steps if steps else 0.0

    def as_dict(self) -> dict:
        return {
            "verify_steps": self.verify_steps,
            "draft_tokens": self.draft_tokens,
            "accepted_tokens": self.accepted_tokens,
            "acceptance_rate": round(self.acceptance_rate, 4),
            "mean_accepted_length": round(self.mean_accepted_length, 4),
            "acceptance_length_histogram": {str(k): v for k, v in sorted(self.emitted_per_step.items())},
            "rollback_tokens": self.rollback_tokens,
            "branches": self.branches,
            "branch_hits": self.branch_hits,
            "proposers": {name: c.as_dict() for name, c in sorted(self.proposers.items())},
        }


class Sequence:
    def __init__(self, request: Request, spec: SpecParams):
        self.request = request
        self.spec = spec
        self.tokens: list[int] = list(request.prompt_ids)
        self.prompt_len = len(self.tokens)
        self.target_slot: int | None = None
        self.draft_slot: int | None = None
        self.target_len = 0
        self.draft_len = 0
        self.finish_reason: FinishReason | None = None
        self.stats = SeqStats()
        self.seed = request.sampling.seed if request.sampling.seed is not None else secrets.randbits(63)
        self._generators: dict[tuple[str, torch.device], torch.Generator] = {}

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def sampling(self) -> SamplingParams:
        return self.request.sampling

    @property
    def num_generated(self) -> int:
        return len(self.tokens) - self.prompt_len

    @property
    def generated(self) -> list[int]:
        return self.tokens[self.prompt_len :]

    def generator(self, device: torch.device, stream: str = "target") -> torch.Generator:
        """This sequence's own random stream (``draft`` or ``target``) on ``device``: its draws never
        depend on the batch, and the draft and the target (which may run in different threads)
        never share one."""
        key = (stream, torch.device(device))
        if key not in self._generators:
            salt = {"target": 0, "draft": 1}[stream]
            self._generators[key] = torch.Generator(device=device).manual_seed(self.seed + 7919 * salt)
        return self._generators[key]
