"""Token-tree proposers: dynamic trees (EAGLE-2 / SpecExec style) and static top-k rank trees.

Construction, per sequence, one batched draft forward per tree level:

    level 1   the root's children, from the catch-up pass's logits
    level d   pick the frontier among the newest nodes, feed it to the draft (tree mask over the
              nodes fed before), give each frontier node its children

A node's score is its cumulative draft log-probability from the root. Dynamic trees expand the
``width`` best-scoring newest nodes; static trees expand exactly the nodes of a fixed shape.

Losslessness decides how children are chosen and pruned (docs/algorithms.md §2):
- greedy requests: children are the draft's top-k (deterministic, ``ChildRule.POINT_MASS``);
  dynamic trees then keep the ``budget`` best nodes of everything drafted (EAGLE-2's rerank:
  any deterministic tree is verified exactly by the point-mass rule).
- sampled requests: children are draws without replacement from the warped draft distribution q
  (Gumbel-top-k, ``ChildRule.WITHOUT_REPLACEMENT``). A node keeps *all* its draws, their count
  fixed before drawing; scores only decide which nodes get children. Dropping a child because of
  its own token (a rerank) would bias the rule, so sampled trees never rerank.

The draft's rows for tree nodes are scratch: the draft cache keeps committed tokens only
(EAGLE's ``stable_kv``), and the next catch-up feeds the accepted tokens.

A tree under construction is a few plain lists grown a level at a time; the torch work is per
level, however wide the frontier (drafting/tree_build.py): one batched top-k or draw over the
frontier's logits, one mask, one draft pass.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Sequence as Seq

import torch

from hedgerow.drafting.base import DraftSequence
from hedgerow.drafting.draft_model import DraftModel
from hedgerow.drafting.tree_build import level_batch, sampled_children, static_table, top_children
from hedgerow.verify.tree import ChildRule, DraftTree


@dataclass(frozen=True)
class TreeShape:
    """What a sequence may draft this step."""

    budget: int  # draft nodes below the root
    depth: int  # levels below the root
    topk: int  # children per expanded node
    static: tuple[tuple[int, ...], ...] | None = None  # rank paths, for static trees


def static_shape(budget: int, depth: int, topk: int) -> tuple[tuple[int, ...], ...]:
    """A static tree of ``budget`` rank paths: best-first under the prior that the rank-r child is
    the target's token with probability proportional to 1 / (r + 2) (closed under ancestors and
    lower-ranked siblings)."""
    prior = [1.0 / (r + 2) for r in range(topk)]
    paths: list[tuple[int, ...]] = []
    heap = [(-prior[0], (0,))]
    while heap and len(paths) < budget:
        neg, path = heapq.heappop(heap)
        paths.append(path)
        if path[-1] + 1 < topk:  # next sibling
            heapq.heappush(heap, (neg / prior[path[-1]] * prior[path[-1] + 1], path[:-1] + (path[-1] + 1,)))
        if len(path) < depth:  # first child
            heapq.heappush(heap, (neg * prior[0], path + (0,)))
    return tuple(sorted(paths, key=lambda p: (len(p), p)))


class _Build:
    """One sequence's tree under construction.

    Nodes are numbered in creation order, node 0 the root. A level's nodes are created together,
    so they are one range of numbers (``newest``) and numbering is already breadth-first.
    """

    def __init__(self, seq: DraftSequence, shape: TreeShape):
        self.seq, self.shape = seq, shape
        self.greedy = seq.sampling.greedy
        self.table = static_table(shape.static) if shape.static is not None else None
        self.tokens = [seq.tokens[-1]]
        self.parents = [-1]
        self.scores = [0.0]  # sum of the draft's log q along the path from the root
        self.rank = [0]  # static trees: the node's rank path, as its id in the shape's table
        self.rows: list[list[int]] = [[]]  # fed nodes: the tree rows of the node and its ancestors
        self.newest = (0, 1)  # the last level's nodes, [lo, hi)
        self.level = 0  # their depth
        self.prefix = seq.draft_len  # committed rows the draft holds, the root's the last
        self.fed = 0  # tree rows so far
        self.probs: list[tuple[list[int], torch.Tensor]] = []  # sampled: (d nodes, q [d, vocab] of their children)

    def frontier(self, max_len: int) -> list[int]:
        """Newest nodes to give children this level; once none, none at every later level (the
        newest level, the rows fed and the budget left stay as they are)."""
        lo, hi = self.newest
        shape = self.shape
        if self.level >= shape.depth:
            return []
        if self.table is not None:
            cand = [u for u in range(lo, hi) if self.table.count[self.rank[u]] > 0]
        elif self.greedy:
            cand = sorted(range(lo, hi), key=lambda u: -self.scores[u])[: shape.topk]
        else:
            left = shape.budget - (len(self.tokens) - 1)
            width = max(1, (shape.budget - shape.topk) // (shape.topk * max(1, shape.depth - 1)))
            width = min(width, -(-left // shape.topk)) if left > 0 else 0
            cand = sorted(range(lo, hi), key=lambda u: -self.scores[u])[:width]
        return cand[: max(0, max_len - self.prefix - self.fed)]

    def feed(self, f: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Give the frontier f the next tree rows: its tokens [m] and which of the tree rows each
        sees [m, E + m] (E: the rows fed before)."""
        m, e = len(f), self.fed
        for i, u in enumerate(f):
            self.rows[u] = self.rows[self.parents[u]] + [e + i]
        visible = torch.zeros(m, e + m, dtype=torch.bool)
        visible.view(-1)[torch.tensor([i * (e + m) + r for i, u in enumerate(f) for r in self.rows[u]])] = True
        self.fed += m
        return torch.tensor([self.tokens[u] for u in f]), visible

    def expand(self, f: list[int], logits: torch.Tensor) -> None:
        """Children of every frontier node from its draft logits [len(f), vocab], node by node and
        best (greedy) or first drawn (sampled) first, as the new newest level."""
        shape = self.shape
        wanted = [self.table.count[self.rank[u]] for u in f] if self.table is not None else [shape.topk] * len(f)
        if self.greedy:
            counts = wanted
            tokens, logq = top_children(logits, counts)
        else:
            left = None if self.table is not None else shape.budget - (len(self.tokens) - 1)
            generator = self.seq.generator(logits.device, "draft")
            draws = sampled_children(logits, wanted, self.seq.sampling, generator, left)
            counts, tokens, logq = draws.counts, draws.tokens, draws.logq
            if draws.drawn:
                self.probs.append(([f[j] for j in draws.drawn], draws.q))
        lo, i = len(self.tokens), 0
        for u, k in zip(f, counts):
            for r in range(k):
                self.tokens.append(tokens[i])
                self.parents.append(u)
                self.scores.append(self.scores[u] + logq[i])
                self.rows.append([])
                if self.table is not None:
                    self.rank.append(self.table.child[self.rank[u]][r])
                i += 1
        self.newest, self.level = (lo, len(self.tokens)), self.level + 1

    def finish(self, draft: DraftModel) -> DraftTree:
        keep = range(len(self.tokens))
        if self.greedy and self.table is None and len(self.tokens) - 1 > self.shape.budget:
            keep = self._rerank()
        new = {u: i for i, u in enumerate(keep)}
        tokens = torch.tensor([self.tokens[u] for u in keep])
        parents = torch.tensor([new[self.parents[u]] if u else -1 for u in keep])
        if self.greedy:
            return DraftTree(tokens, parents, ChildRule.POINT_MASS)
        probs = torch.zeros(len(keep), draft.target_vocab, device=draft.device)
        if self.probs:
            nodes = torch.tensor([u for us, _ in self.probs for u in us], device=draft.device)
            probs.index_copy_(0, nodes, torch.cat([q for _, q in self.probs]))
        return DraftTree(tokens, parents, ChildRule.WITHOUT_REPLACEMENT, probs)

    def _rerank(self) -> list[int]:
        """The ``budget`` best nodes by score, closed under ancestors (ties: older node first),
        with the root, ascending (breadth-first: see the class docstring)."""
        chosen = {0}
        for u in sorted(range(1, len(self.tokens)), key=lambda u: (-self.scores[u], u)):
            if len(chosen) > self.shape.budget:
                break
            if self.parents[u] in chosen:
                chosen.add(u)
        return sorted(chosen)


class TreeProposer:
    def __init__(self, draft: DraftModel):
        self.draft = draft

    def propose(self, seqs: Seq[DraftSequence], shapes: Seq[TreeShape], passes: list[int]) -> list[DraftTree]:
        """One tree per sequence (the root alone where its shape allows nothing); the token count
        of every draft pass is appended to ``passes``."""
        trees = [DraftTree.root_only(s.tokens[-1]) for s in seqs]
        active = [i for i, sh in enumerate(shapes) if sh.budget > 0 and sh.depth > 0]
        if not active:
            return trees
        logits = self.draft.catch_up([seqs[i] for i in active], passes)  # [B, vocab]: the root's next token
        builds = [_Build(seqs[i], shapes[i]) for i in active]
        for b, row in zip(builds, logits):
            b.expand([0], row[None])
        growing = builds
        for _ in range(1, max(b.shape.depth for b in builds)):
            frontier = [(b, f) for b in growing if (f := b.frontier(self.draft.max_len))]
            if not frontier:
                break
            growing = [b for b, _ in frontier]
            out = self._feed(frontier, passes)  # [B', n, vocab]
            for (b, f), rows in zip(frontier, out):
                b.expand(f, rows[: len(f)])
        for i, b in zip(active, builds):
            trees[i] = b.finish(self.draft)
        return trees

    def _feed(self, frontier: list[tuple[_Build, list[int]]], passes: list[int]) -> torch.Tensor:
        """One batched draft pass over every sequence's frontier; logits [B', n, vocab]."""
        blocks = [b.feed(f) for b, f in frontier]
        flat = level_batch(
            [tokens for tokens, _ in blocks],
            [b.level for b, _ in frontier],
            [b.prefix for b, _ in frontier],
            [visible for _, visible in blocks],
        )
        return self.draft.forward_logits([b.seq.draft_slot for b, _ in frontier], flat, passes)
