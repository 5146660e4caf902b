"""Chain proposer: the draft model drafts a run of tokens.

Greedy requests draft the draft's argmax (children are point masses), as a greedy run: the runner
drafts the whole chain on the device in one or a few calls (server/engine/greedy_run.py), each
chain cut afterwards where it was to end. Sampled requests (and chains a greedy run cannot take:
hedge branches, chains past the cache) draft one batched pass per token: each token drawn from
the draft's warped distribution q, kept for verification (i.i.d. children).

Draft KV: the catch-up pass writes the rows of every committed token the draft has not seen yet
(usually the last correction/bonus token, plus the last draft token when all were accepted);
drafting then writes rows for d_1 .. d_(n-1). After verification the rows that agree with the
committed tokens stay: the catch-up rows and the accepted draft tokens' rows (``commit``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence as Seq

import torch

from hedgerow.drafting.base import DraftSequence
from hedgerow.drafting.branch import Hedge
from hedgerow.drafting.draft_model import DraftModel
from hedgerow.verify.flatten import flatten_chains
from hedgerow.verify.sampling import sample, warp_probs
from hedgerow.verify.tree import ChildRule, DraftTree

StopDrafting = Callable[[torch.Tensor], bool]  # asked with each next-token distribution before drafting it


@dataclass
class Chains:
    trees: list[DraftTree]  # one per sequence; the root alone where nothing was drafted
    last_logits: list[torch.Tensor | None]  # the draft's logits at the last draft token (None without one)


class ChainProposer:
    def __init__(self, draft: DraftModel):
        self.draft = draft

    def propose(
        self,
        seqs: Seq[DraftSequence],
        sizes: Seq[int],
        ready: Seq[Hedge | None],
        passes: list[int],
        stop: StopDrafting | None = None,
    ) -> Chains:
        """One chain of up to ``sizes[i]`` draft tokens per sequence. ``ready[i]``, a hedge branch
        that came true last step, is the chain itself: one catch-up pass gives the draft its rows,
        nothing is drafted. ``last_logits`` lets the brancher hedge against the last token's rejection."""
        trees = [DraftTree.root_only(s.tokens[-1]) for s in seqs]
        last_out: list[torch.Tensor | None] = [None] * len(seqs)
        active = [i for i, g in enumerate(sizes) if g > 0 or ready[i] is not None]
        if not active:
            return Chains(trees, last_out)
        group = [seqs[i] for i in active]
        hedges = [ready[i] for i in active]
        want = [0 if hedges[k] else sizes[i] for k, i in enumerate(active)]
        drafted: list[list[int]] = [list(h.tail) if h else [] for h in hedges]
        qs: list[list[torch.Tensor]] = [list(h.probs) if h else [] for h in hedges]

        last: list[torch.Tensor | None] = [None] * len(group)
        fast = self._greedy_runs(group, want, drafted, last, passes, stop)
        rest = [k for k in range(len(group)) if k not in fast]
        if rest:
            self._loop([group[k] for k in rest], [hedges[k] for k in rest], [want[k] for k in rest],
                       [drafted[k] for k in rest], [qs[k] for k in rest], last, rest, passes, stop)

        for k, i in enumerate(active):
            s = group[k]
            if not drafted[k]:
                continue  # stopped before the first token: the root alone
            tokens = [s.tokens[-1]] + drafted[k]
            last_out[i] = last[k]
            if s.sampling.greedy:
                trees[i] = DraftTree.chain(tokens)
            else:
                probs = torch.stack(qs[k] + [torch.zeros_like(qs[k][0])])  # [n + 1, vocab]; leaf row unused
                trees[i] = DraftTree.chain(tokens, ChildRule.IID, probs)
        return Chains(trees, last_out)

    def _loop(self, group, hedges, want, drafted, qs, last_out, index, passes, stop) -> None:
        """Draft one pass per token (sampled chains, hedges, chains that do not fit a greedy run):
        ``drafted`` and ``qs`` are filled in place, ``last_out[index[k]]`` gets row k's last logits."""
        logits = self.draft.catch_up(group, passes, [d[:-1] for d in drafted])  # [B, vocab]
        last: list[torch.Tensor | None] = [logits[k] if hedges[k] else None for k in range(len(group))]
        live = [k for k in range(len(group)) if want[k] > 0]
        rows = {k: k for k in live}  # live sequence -> its row of ``logits``
        while live:
            picks = self._choose(logits[[rows[k] for k in live]], [group[k] for k in live])
            for row, k in enumerate(live):
                token, q = picks[row]
                if stop is not None and stop(q if q is not None else torch.softmax(logits[rows[k]], -1)):
                    want[k] = len(drafted[k])  # the draft is unsure here: stop this chain
                    continue
                last[k] = logits[rows[k]]
                drafted[k].append(token)
                if q is not None:
                    qs[k].append(q)
            live = [k for k in live if len(drafted[k]) < want[k]]
            if not live:
                break
            # feed each live sequence its newest draft token, at the row after its last one
            flat = flatten_chains(
                [[drafted[k][-1]] for k in live], [group[k].draft_len + len(drafted[k]) - 1 for k in live]
            )
            logits = self.draft.forward_logits([group[k].draft_slot for k in live], flat, passes)[:, 0]
            rows = {k: r for r, k in enumerate(live)}
        for k, i in enumerate(index):
            last_out[i] = last[k]

    def _greedy_runs(self, group, want, drafted, last, passes, stop) -> set[int]:
        """Greedy chains drafted on the device (``DraftModel.greedy_chains``): every row runs the
        longest chain, then each is cut to its own size and where ``stop`` first says so, which is
        where the pass-per-token loop would have stopped. Fills ``drafted`` and ``last``; returns the
        rows it drafted."""
        rows = [k for k in range(len(group)) if want[k] > 0 and group[k].sampling.greedy]
        top = max((want[k] for k in rows), default=0)
        rows = [k for k in rows if self.draft.fits_greedy_run(group[k], top)]
        if not rows:
            return set()
        tokens, logits = self.draft.greedy_chains([group[k] for k in rows], max(want[k] for k in rows), passes)
        for r, k in enumerate(rows):
            n = want[k]
            if stop is not None:
                n = next((j for j in range(n) if stop(torch.softmax(logits[r, j], -1))), n)
            drafted[k].extend(tokens[r][:n])
            last[k] = logits[r, n - 1] if n else None
        return set(rows)

    def _choose(self, logits: torch.Tensor, seqs: Seq[DraftSequence]) -> list[tuple[int, torch.Tensor | None]]:
        """Each sequence's next draft token, and the q it was drawn from (None: a point mass)."""
        out: list[tuple[int, torch.Tensor | None]] = [None] * len(seqs)  # type: ignore[list-item]
        greedy = [i for i, s in enumerate(seqs) if s.sampling.greedy]
        if greedy:
            for i, tok in zip(greedy, logits[greedy].argmax(-1).tolist()):
                out[i] = (tok, None)
        for i, s in enumerate(seqs):
            if not s.sampling.greedy:
                q = warp_probs(logits[i], s.sampling)
                out[i] = (int(sample(q, s.generator(q.device, "draft"))), q)
        return out

    @staticmethod
    def commit(seq: DraftSequence, drafted: int, accepted: int) -> None:
        """Keep the draft rows of the accepted ones of the ``drafted`` tokens this chain drafted
        (d_1 .. d_(n-1) have rows)."""
        if drafted:
            seq.draft_len += min(accepted, drafted - 1)
