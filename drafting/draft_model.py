"""The draft model as proposers use it: catch up on committed tokens, give next-token logits on
the target's vocabulary, and choose children (top-k, or Gumbel-top-k draws without replacement).

Every pass appends its token count to the ``passes`` list its caller hands in: the cost policy
prices a step's draft phase from them, and the list belongs to the one ``propose`` call that
made it (nothing here is reset by anyone else).
"""

from __future__ import annotations

from typing import Sequence as Seq

import torch

from hedgerow.drafting.base import DraftRunner, DraftSequence, adapt_vocab
from hedgerow.verify.flatten import FlatBatch
from hedgerow.verify.sampling import SamplingParams, warp_probs


class DraftModel:
    def __init__(self, runner: DraftRunner, target_vocab: int, chunk: int = 512):
        self.runner = runner
        self.target_vocab = target_vocab
        self.chunk = chunk

    @property
    def device(self) -> torch.device:
        return self.runner.device

    @property
    def max_len(self) -> int:
        return self.runner.max_len

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return adapt_vocab(self.runner.logits(hidden), self.target_vocab)

    def forward_logits(self, slots: list[int], flat: FlatBatch, passes: list[int]) -> torch.Tensor:
        """Logits [B, N, vocab] of a packed block."""
        passes.append(int(flat.num_nodes.sum()))
        return self.logits(self.runner.forward(slots, flat))

    def catch_up(
        self, seqs: Seq[DraftSequence], passes: list[int], then: Seq[list[int]] | None = None
    ) -> torch.Tensor:
        """Feed every committed token the draft has not seen, then the (uncommitted) tokens ``then[i]``;
        logits of the token after the last one fed [B, vocab].

        At least the root is fed (its logits are the first proposal), even if a failed earlier
        attempt already wrote its row. Afterwards ``draft_len == len(tokens)``; the rows of ``then``
        follow it, exactly as if those tokens had been drafted one by one.
        """
        starts = [min(s.draft_len, len(s.tokens) - 1) for s in seqs]
        chains = [s.tokens[a:] + (list(then[i]) if then else []) for i, (s, a) in enumerate(zip(seqs, starts))]
        passes.append(sum(len(c) for c in chains))
        hidden = self.runner.extend([s.draft_slot for s in seqs], starts, chains, self.chunk)
        for s in seqs:
            s.draft_len = len(s.tokens)
        return self.logits(hidden)

    def fits_greedy_run(self, seq: DraftSequence, tokens: int) -> bool:
        """Whether a greedy run of ``tokens`` draft tokens fits ``seq``'s KV rows (rows are written
        for the catch-up tokens and every drafted token but the last), on a runner that drafts so."""
        return self.runner.greedy_runs and len(seq.tokens) + tokens - 1 <= self.max_len

    def greedy_chains(self, seqs: Seq[DraftSequence], tokens: int, passes: list[int]) -> tuple[list[list[int]], torch.Tensor]:
        """Catch up as ``catch_up`` does, then draft ``tokens`` greedy tokens per sequence without
        a host round trip per token: the tokens [B][tokens] and the logits each was chosen from,
        on the target's vocabulary [B, tokens, vocab]. Every sequence drafts ``tokens``; one that
        wanted fewer cuts its chain (the rows past its cut are never committed)."""
        starts = [min(s.draft_len, len(s.tokens) - 1) for s in seqs]
        fed = [s.tokens[a:] for s, a in zip(seqs, starts)]
        passes.append(sum(len(f) for f in fed))
        passes.extend([len(seqs)] * (tokens - 1))
        out, logits = self.runner.greedy_chains([s.draft_slot for s in seqs], starts, fed, tokens, self.target_vocab)
        for s in seqs:
            s.draft_len = len(s.tokens)
        return out, adapt_vocab(logits, self.target_vocab)


def top_children(logits: torch.Tensor, k: int) -> tuple[list[int], list[float]]:
    """Deterministic children: the k most probable tokens and their draft log-probabilities."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    val, idx = logp.topk(k)
    return idx.tolist(), val.tolist()


def sampled_children(
    logits: torch.Tensor, k: int, params: SamplingParams, generator: torch.Generator
) -> tuple[list[int], list[float], torch.Tensor]:
    """k draws without replacement from the warped draft distribution q, in draw order.

    Gumbel-top-k: the k largest ``log q + Gumbel`` keys are a draw without replacement. At most
    as many draws as q has non-zero tokens. Returns tokens, their log q, and q itself.
    """
    q = warp_probs(logits, params)
    logq = torch.log(q)
    gumbel = -torch.log(torch.empty_like(q).exponential_(generator=generator))
    k = min(k, int((q > 0).sum()))
    keys = (logq + gumbel).masked_fill(q <= 0, float("-inf"))
    idx = keys.topk(k).indices
    return idx.tolist(), logq[idx].tolist(), q
