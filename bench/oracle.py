"""A timing-faithful oracle drafter: the draft model really runs (its cost is real), but the tokens
it proposes are the target's known greedy continuation, each replaced by a wrong token with
probability 1 - alpha. Under greedy verification a draft token is then accepted with probability
exactly alpha, independently per position: the setting of the expected-speedup model
(docs/algorithms.md).

It is a ``ChainProposer`` whose choice of token is swapped: the catch-up pass, the draft's greedy
run or forward per token, the draft KV bookkeeping (``commit``) are the chain proposer's own. Bench code installs
it with ``engine.proposer.chains = OracleProposer(engine.proposer.draft, ...)``; greedy requests only.
"""

from __future__ import annotations

import random
from collections.abc import Sequence as Seq

import torch

from hedgerow.drafting.chain import ChainProposer
from hedgerow.drafting.draft_model import DraftModel
from hedgerow.verify.tree import DraftTree


class OracleProposer(ChainProposer):
    def __init__(self, draft: DraftModel, vocab_size: int):
        super().__init__(draft)
        self.vocab_size = vocab_size
        self.continuations: dict[str, list[int]] = {}  # request_id -> the target's greedy continuation
        self.alpha = 1.0
        self.rng = random.Random(0)
        self._offset: dict[int, int] = {}  # id(seq) -> draft tokens chosen so far this step

    def configure(self, alpha: float, seed: int) -> None:
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        self.alpha = alpha
        self.rng = random.Random(seed)

    def propose(self, seqs: Seq, sizes: Seq[int], *args, **kwargs) -> list[DraftTree]:
        self._offset = {id(s): 0 for s in seqs}
        return super().propose(seqs, sizes, *args, **kwargs)

    def _choose(self, logits: torch.Tensor, seqs: Seq) -> list[tuple[int, torch.Tensor | None]]:
        logits.argmax(-1).tolist()  # the work a real greedy pick does (argmax, device->host copy), discarded
        return [(self._pick(s), None) for s in seqs]

    def _greedy_runs(self, group, want, drafted, last, passes, stop) -> set[int]:
        """The greedy run really runs (its cost is real); its tokens are then swapped for the oracle's
        (the draft's KV rows stay those of its own tokens: the oracle never reads the draft's logits)."""
        before = [len(d) for d in drafted]
        rows = super()._greedy_runs(group, want, drafted, last, passes, stop)
        for k in rows:
            drafted[k][before[k]:] = [self._pick(group[k]) for _ in drafted[k][before[k]:]]
        return rows

    def _pick(self, s) -> int:
        """The oracle's next draft token for ``s``: the target's, with probability alpha."""
        k = self._offset[id(s)]
        self._offset[id(s)] = k + 1
        known = self.continuations.get(s.request_id, [])
        pos = len(s.tokens) - s.prompt_len + k  # index of this draft token in the continuation
        true = known[pos] if pos < len(known) else self.rng.randrange(self.vocab_size)
        if self.rng.random() < self.alpha:
            return true
        return (true + 1 + self.rng.randrange(self.vocab_size - 1)) % self.vocab_size  # any other: rejected for sure
