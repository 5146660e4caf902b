"""Draft while the target verifies: hedge branches for the likely outcomes of the verification.

A chain ``root, d_1 .. d_k`` goes to the target. Meanwhile the draft grows, in one batched pass per
level, branches from the row of ``d_(k-1)`` (all branches share the prefix up to there):

- the continuation (``pearl`` and ``branch``): feed ``d_k``, guess the target's bonus token e_1,
  draft on. It hits when all k tokens are accepted and the bonus is e_1.
- alternatives (``branch``): the draft's next most likely tokens a_b in place of ``d_k``, each
  followed by a drafted tail. A hit is k - 1 accepted tokens and the correction a_b.

On a hit the branch's tail is the next step's draft at once: no sequential drafting, one catch-up
pass instead. Otherwise the branches are dropped (rolled back: their rows are scratch).

Lossless: the emitted token is still the target's own accept/residual draw, and a tail kept after
a hit was drawn from the draft's q given (prefix, anchor) before, and independently of, the
target's draw; it is verified next step by the same rule as any chain.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence as Seq

import torch

from hedgerow.drafting.base import DraftSequence
from hedgerow.drafting.draft_model import DraftModel
from hedgerow.verify.flatten import pack
from hedgerow.verify.sampling import sample, warp_probs
from hedgerow.verify.tree import ChildRule, DraftTree


@dataclass
class Hedge:
    accepted: int  # the number of accepted draft tokens this branch assumes
    anchor: int  # the token the target must emit next (bonus or correction)
    tail: list[int]  # drafted after the anchor
    probs: list[torch.Tensor]  # q of each tail token (sampled requests); empty for greedy

    def tree(self) -> DraftTree:
        tokens = [self.anchor] + self.tail
        if not self.probs:
            return DraftTree.chain(tokens)
        return DraftTree.chain(tokens, ChildRule.IID, torch.stack(self.probs + [torch.zeros_like(self.probs[0])]))


def match(hedges: Seq[Hedge], num_accepted: int, last_token: int) -> Hedge | None:
    """The branch whose assumption came true (and that has a tail to offer), if any."""
    for h in hedges:
        if h.accepted == num_accepted and h.anchor == last_token and h.tail:
            return h
    return None


class Brancher:
    def __init__(self, draft: DraftModel, alternatives: int):
        self.draft = draft
        self.alternatives = alternatives  # 0: the continuation alone (pearl)

    def hedge(
        self,
        seqs: Seq[DraftSequence],
        trees: Seq[DraftTree],
        last_logits: Seq[torch.Tensor | None],
        length: Seq[int],
        passes: list[int],
    ) -> list[list[Hedge]]:
        """Draft hedge branches for every chain; ``last_logits[i]`` is the draft's logits for d_k,
        ``length[i]`` the tokens each branch may draft. Pass sizes are appended to ``passes``."""
        out: list[list[Hedge]] = [[] for _ in seqs]
        jobs = []  # (index, seeds, assumed accepted counts, levels)
        for i, (s, tree, logits) in enumerate(zip(seqs, trees, last_logits)):
            k = tree.num_draft_tokens
            if k == 0 or logits is None or length[i] < 1:
                continue
            d_k = int(tree.tokens[-1])
            if s.sampling.greedy:
                ranked = logits.topk(self.alternatives + 1).indices.tolist()
            else:
                q = warp_probs(logits, s.sampling)
                ranked = [t for t in q.topk(self.alternatives + 1).indices.tolist() if q[t] > 0]
            alts = [t for t in ranked if t != d_k][: self.alternatives]
            rows = s.draft_len + k - 1  # rows visible to every branch: committed + d_1 .. d_(k-1)
            branches = 1 + len(alts)
            levels = min(length[i], (self.draft.max_len - rows) // branches)
            if levels < 1:
                continue
            jobs.append((i, [d_k] + alts, [k] + [k - 1] * len(alts), levels, rows))
        if not jobs:
            return out

        # per job: the tokens of each branch (seed first) and the q of every drafted token
        tokens = {i: [[seed] for seed in seeds] for i, seeds, _, _, _ in jobs}
        probs: dict[int, list[list[torch.Tensor]]] = {i: [[] for _ in seeds] for i, seeds, _, _, _ in jobs}
        for level in range(1, max(j[3] for j in jobs) + 1):
            live = [j for j in jobs if level <= j[3]]
            batch_tokens, depths, visible, lens, roots, slots = [], [], [], [], [], []
            for i, seeds, _, _, rows in live:
                nb = len(seeds)
                vis = torch.zeros(nb, level * nb, dtype=torch.bool)
                for r in range(nb):
                    vis[r, [(lv * nb) + r for lv in range(level)]] = True
                batch_tokens.append(torch.tensor([br[-1] for br in tokens[i]]))
                depths.append(torch.full((nb,), level))
                visible.append(vis)
                lens.append(rows)
                roots.append(len(seqs[i].tokens) - 1 + trees[i].num_draft_tokens - 1)
                slots.append(seqs[i].draft_slot)
            logits = self.draft.forward_logits(slots, pack(batch_tokens, depths, lens, visible, roots), passes)
            for row, (i, seeds, _, _, _) in enumerate(live):
                s = seqs[i]
                for r in range(len(seeds)):
                    lg = logits[row, r]
                    if s.sampling.greedy:
                        tokens[i][r].append(int(lg.argmax()))
                    else:
                        q = warp_probs(lg, s.sampling)
                        tokens[i][r].append(int(sample(q, s.generator(q.device, "draft"))))
                        probs[i][r].append(q)

        for i, seeds, accepted, _, _ in jobs:
            for r, (branch, qs) in enumerate(zip(tokens[i], probs[i])):
                if r == 0:  # continuation: [d_k, e_1 (the bonus guess), tail ...]
                    out[i].append(Hedge(accepted[r], branch[1], branch[2:], qs[1:]))
                else:  # alternative: [a_b, tail ...]
                    out[i].append(Hedge(accepted[r], branch[0], branch[1:], qs))
        return out
