"""A timing-faithful oracle drafter: the draft model really runs (its cost is real), but the tokens
it proposes are the target's known greedy continuation, each replaced by a wrong token with
probability 1 - alpha. Under greedy verification a draft token is then accepted with probability
exactly alpha, independently per position: the setting of the expected-speedup model
(docs/algorithms.md).

It is a ``ChainProposer`` whose choice of token is swapped: the catch-up pass, the draft forward
per token, the draft KV bookkeeping (``commit``) are the chain proposer's own. Bench code installs
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
        out = []
        for s in seqs:
            k = self._offset[id(s)]
            self._offset[id(s)] = k + 1
            known = self.continuations.get(s.request_id, [])
            pos = len(s.tokens) - s.prompt_len + k  # index of this draft token in the continuation
            true = known[pos] if pos < len(known) else self.rng.randrange(self.vocab_size)
            if self.rng.random() < self.alpha:
                out.append((true, None))
            else:  # any token but the true one: rejected for sure
                out.append(((true + 1 + self.rng.randrange(self.vocab_size - 1)) % self.vocab_size, None))
        return out
