"""Token-tree proposers: dynamic trees (EAGLE-2 / SpecExec style) and static top-k rank trees.

Construction, per sequence, one batched draft forward per tree level:

    level 1   the root's children, from the catch-up pass's logits
    level d   pick the frontier among the newest nodes, feed it to the draft (tree mask over the
              nodes fed before), give each frontier node its children

A node's score is its cumulative draft log-probability from the root. Dynamic trees expand the
``width`` best-scoring newest nodes; static trees expand exactly the nodes of a fixed shape.

Losslessness decides how children are chosen and pruned (algorithms.md §2):
- greedy requests: children are the draft's top-k (deterministic, ``ChildRule.POINT_MASS``);
  dynamic trees then keep the ``budget`` best nodes of everything drafted (EAGLE-2's rerank:
  any deterministic tree is verified exactly by the point-mass rule).
- sampled requests: children are draws without replacement from the warped draft distribution q
  (Gumbel-top-k, ``ChildRule.WITHOUT_REPLACEMENT``). A node keeps *all* its draws, their count
  fixed before drawing; scores only decide which nodes get children. Dropping a child because of
  its own token (a rerank) would bias the rule, so sampled trees never rerank.

The draft's rows for tree nodes are scratch: the draft cache keeps committed tokens only
(EAGLE's ``stable_kv``), and the next catch-up feeds the accepted tokens.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from typing import Sequence as Seq

import torch

from hedgerow.drafting.base import DraftSequence
from hedgerow.drafting.draft_model import DraftModel, sampled_children, top_children
from hedgerow.verify.flatten import pack
from hedgerow.verify.tree import ChildRule, DraftTree


@dataclass(frozen=True)
class TreeShape:
    """What a sequence may draft this step."""

    budget: int  # draft nodes below the root
    depth: int  # levels below the root
    topk: int  # children per expanded node
    static: tuple[tuple[int, ...], ...] | None = None  # rank paths, for static trees


@dataclass
class _Node:
    token: int
    parent: int
    depth: int
    score: float
    rank: tuple[int, ...]  # child ranks from the root (static trees)


@dataclass
class _Build:
    seq: DraftSequence
    shape: TreeShape
    nodes: list[_Node]
    probs: dict[int, torch.Tensor] = field(default_factory=dict)  # node -> q its children came from
    fed: list[int] = field(default_factory=list)  # nodes whose KV the draft holds, in row order
    newest: list[int] = field(default_factory=list)

    @property
    def greedy(self) -> bool:
        return self.seq.sampling.greedy


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
        builds = [_Build(seqs[i], shapes[i], [_Node(seqs[i].tokens[-1], -1, 0, 0.0, ())]) for i in active]
        logits = self.draft.catch_up([b.seq for b in builds], passes)  # [B, vocab]: the root's next token
        for b, row in zip(builds, logits):
            self._expand(b, 0, row)
        for _ in range(1, max(b.shape.depth for b in builds)):
            frontier = [(b, self._frontier(b)) for b in builds]
            frontier = [(b, f) for b, f in frontier if f]
            if not frontier:
                break
            out = self._feed(frontier, passes)  # [B', n, vocab]
            for (b, f), rows in zip(frontier, out):
                b.newest = []
                for u, row in zip(f, rows):
                    self._expand(b, u, row)
        for i, b in zip(active, builds):
            trees[i] = self._finish(b)
        return trees

    # --- construction ------------------------------------------------------------------------
    def _children_count(self, b: _Build, u: int) -> int:
        node = b.nodes[u]
        if b.shape.static is not None:
            return sum(1 for p in b.shape.static if len(p) == node.depth + 1 and p[:-1] == node.rank)
        if b.greedy:
            return b.shape.topk
        return min(b.shape.topk, b.shape.budget - (len(b.nodes) - 1))  # known before drawing

    def _expand(self, b: _Build, u: int, logits: torch.Tensor) -> None:
        k = self._children_count(b, u)
        if k <= 0:
            return
        if b.greedy:
            tokens, logq = top_children(logits, k)
        else:
            tokens, logq, q = sampled_children(logits, k, b.seq.sampling, b.seq.generator(logits.device, "draft"))
            b.probs[u] = q
        parent = b.nodes[u]
        for r, (tok, lq) in enumerate(zip(tokens, logq)):
            b.nodes.append(_Node(tok, u, parent.depth + 1, parent.score + lq, parent.rank + (r,)))
            b.newest.append(len(b.nodes) - 1)

    def _frontier(self, b: _Build) -> list[int]:
        """Newest nodes to give children this level."""
        cand = [u for u in b.newest if b.nodes[u].depth < b.shape.depth]
        if b.shape.static is not None:
            cand = [u for u in cand if self._children_count(b, u) > 0]
        elif b.greedy:
            cand = sorted(cand, key=lambda u: -b.nodes[u].score)[: b.shape.topk]
        else:
            left = b.shape.budget - (len(b.nodes) - 1)
            width = max(1, (b.shape.budget - b.shape.topk) // (b.shape.topk * max(1, b.shape.depth - 1)))
            cand = sorted(cand, key=lambda u: -b.nodes[u].score)[: min(width, -(-left // b.shape.topk))] if left > 0 else []
        room = self.draft.max_len - b.seq.draft_len - len(b.fed)
        return cand[: max(0, room)]

    def _feed(self, frontier: list[tuple[_Build, list[int]]], passes: list[int]) -> list[torch.Tensor]:
        """One batched draft pass over every sequence's frontier; logits per frontier node."""
        tokens, depths, visible, lens, roots, slots = [], [], [], [], [], []
        for b, f in frontier:
            order = b.fed + f
            index = {u: j for j, u in enumerate(order)}
            vis = torch.zeros(len(f), len(order), dtype=torch.bool)
            for i, u in enumerate(f):
                v = u
                while v > 0:  # the node and its ancestors below the root (the root is in the prefix)
                    vis[i, index[v]] = True
                    v = b.nodes[v].parent
            tokens.append(torch.tensor([b.nodes[u].token for u in f]))
            depths.append(torch.tensor([b.nodes[u].depth for u in f]))
            visible.append(vis)
            lens.append(b.seq.draft_len)
            roots.append(b.seq.draft_len - 1)
            slots.append(b.seq.draft_slot)
        logits = self.draft.forward_logits(slots, pack(tokens, depths, lens, visible, roots), passes)
        for b, f in frontier:
            b.fed.extend(f)
        return [logits[i, : len(f)] for i, (_, f) in enumerate(frontier)]

    def _finish(self, b: _Build) -> DraftTree:
        keep = list(range(len(b.nodes)))
        if b.greedy and b.shape.static is None and len(b.nodes) - 1 > b.shape.budget:
            keep = self._rerank(b)
        keep.sort(key=lambda u: (b.nodes[u].depth, u))  # breadth-first: parents before children
        new = {u: i for i, u in enumerate(keep)}
        tokens = torch.tensor([b.nodes[u].token for u in keep])
        parents = torch.tensor([new[b.nodes[u].parent] if u else -1 for u in keep])
        if b.greedy:
            return DraftTree(tokens, parents, ChildRule.POINT_MASS)
        probs = torch.zeros(len(keep), self.draft.target_vocab, device=self.draft.device)
        for u, q in b.probs.items():
            probs[new[u]] = q
        return DraftTree(tokens, parents, ChildRule.WITHOUT_REPLACEMENT, probs)

    def _rerank(self, b: _Build) -> list[int]:
        """The ``budget`` best nodes by score, closed under ancestors (ties: older node first)."""
        chosen = {0}
        for u in sorted(range(1, len(b.nodes)), key=lambda u: (-b.nodes[u].score, u)):
            if len(chosen) > b.shape.budget:
                break
            if b.nodes[u].parent in chosen:
                chosen.add(u)
        return sorted(chosen)
