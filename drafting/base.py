"""What drafting needs from the rest of the engine: a sequence, and a runner for the draft model.

Both are protocols: drafting depends on no engine module. The engine's ``Sequence`` and
``ModelRunner`` satisfy them; proposers return ``hedgerow.verify.tree.DraftTree``s, the only
thing drafting and verification share.
"""

from __future__ import annotations

from typing import Protocol

import torch

from hedgerow.drafting.spec import SpecParams
from hedgerow.verify.flatten import FlatBatch
from hedgerow.verify.sampling import SamplingParams


class DraftSequence(Protocol):
    request_id: str
    tokens: list[int]  # committed tokens, prompt included
    prompt_len: int
    spec: SpecParams
    draft_slot: int | None
    draft_len: int  # rows of ``tokens`` the draft's KV slot holds

    @property
    def sampling(self) -> SamplingParams: ...

    def generator(self, device: torch.device, stream: str = "target") -> torch.Generator: ...


class DraftRunner(Protocol):
    """One model with its slot KV cache (the engine's ``ModelRunner``)."""

    device: torch.device
    max_len: int
    greedy_runs: bool  # whether greedy chains are drafted with ``greedy_chains`` (else one pass per token)

    def forward(self, slots: list[int], flat: FlatBatch) -> torch.Tensor:
        """Hidden states [B, N, hidden] of a flattened batch; every node's KV is written."""

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """fp32 logits of the given hidden states."""

    def extend(self, slots: list[int], prefix_lens: list[int], chains: list[list[int]], chunk: int) -> torch.Tensor:
        """Append token runs to the slots; hidden state of each run's last token [B, hidden]."""

    def greedy_chains(self, slots: list[int], starts: list[int], fed: list[list[int]], tokens: int,
                      vocab: int) -> tuple[list[list[int]], torch.Tensor]:
        """Feed row i the tokens ``fed[i]`` (KV rows from ``starts[i]`` on), then draft ``tokens``
        greedy tokens per row on the first ``vocab`` tokens: the tokens and the logits each was
        chosen from [B, tokens, vocab']. Rows are written for the fed tokens and every drafted token
        but the last, exactly as the pass-per-token loop writes them."""


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
