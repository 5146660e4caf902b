"""What a proposer needs of a sequence, and the proposer interface the engine calls.

Proposers return ``verify.tree.DraftTree``s; that dataclass is the only thing drafting and
verification share.
"""

from __future__ import annotations

from typing import Protocol, Sequence

import torch

from hedgerow.verify.sampling import SamplingParams
from hedgerow.verify.tree import DraftTree


class DraftSequence(Protocol):
    tokens: list[int]
    draft_slot: int | None
    draft_len: int

    @property
    def sampling(self) -> SamplingParams: ...

    def generator(self, device: torch.device, stream: str = "target") -> torch.Generator: ...


class Proposer(Protocol):
    def propose(self, seqs: Sequence[DraftSequence], budgets: Sequence[int]) -> list[DraftTree]:
        """One tree per sequence; a budget of 0 gives the root alone (plain decoding)."""

    def commit(self, seq: DraftSequence, tree: DraftTree, num_accepted: int) -> None:
        """Bring the draft's cache in line with what the target accepted."""


def adapt_vocab(logits: torch.Tensor, vocab: int) -> torch.Tensor:
    """Put draft logits on the target's vocabulary.

    A larger draft head is cut (the draft then never proposes a token the target cannot emit; q
    stays the distribution it really sampled from); a smaller one is padded with -inf (q = 0).
    """
    have = logits.shape[-1]
    if have == vocab:
        return logits
    if have > vocab:
        return logits[..., :vocab]
    pad = logits.new_full((*logits.shape[:-1], vocab - have), float("-inf"))
    return torch.cat([logits, pad], dim=-1)
