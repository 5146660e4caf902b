"""The proposer the engine calls: one step's drafts for a batch of chain and tree sequences.

``propose`` returns a ``Drafts`` value with everything the rest of the step needs from drafting:
the trees to verify, the chains' last draft logits (the brancher hedges against their rejection),
and the token count of every draft pass (the cost policy prices the draft phase from them).
A hedge branch that came true last step (``ready``) is this step's chain at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence as Seq

import torch

from hedgerow.drafting.base import DraftSequence
from hedgerow.drafting.branch import Brancher, Hedge
from hedgerow.drafting.chain import ChainProposer
from hedgerow.drafting.draft_model import DraftModel
from hedgerow.drafting.plan import Room, StepPlan
from hedgerow.drafting.spec import SpecMode
from hedgerow.drafting.tree import TreeProposer, TreeShape, static_shape
from hedgerow.verify.tree import DraftTree


@dataclass
class Drafts:
    trees: list[DraftTree]  # one per sequence; the root alone where nothing was drafted
    last_logits: list[torch.Tensor | None]  # chains: the draft's logits at the last draft token
    passes: list[int]  # tokens of each draft pass, in order

    @classmethod
    def none(cls, seqs: Seq[DraftSequence]) -> "Drafts":
        """Plain decoding: every tree is its root alone."""
        return cls([DraftTree.root_only(s.tokens[-1]) for s in seqs], [None] * len(seqs), [])


class Proposer:
    def __init__(self, draft: DraftModel, alternatives: int | None = None):
        """``alternatives``: None, no hedging; 0, hedge the continuation (pearl); k > 0, also k
        alternatives to the last draft token (branch)."""
        self.draft = draft
        self.chains = ChainProposer(draft)
        self.trees = TreeProposer(draft)
        self.brancher = Brancher(draft, alternatives) if alternatives is not None else None

    def propose(
        self, seqs: Seq[DraftSequence], plan: StepPlan, rooms: Seq[Room], ready: Mapping[DraftSequence, Hedge]
    ) -> Drafts:
        trees = [DraftTree.root_only(s.tokens[-1]) for s in seqs]
        last: list[torch.Tensor | None] = [None] * len(seqs)
        passes: list[int] = []
        chain = [i for i, s in enumerate(seqs) if s.spec.mode is SpecMode.CHAIN]
        if chain:
            hedges = [_fit(ready.get(seqs[i]), rooms[i].depth) for i in chain]
            out = self.chains.propose(
                [seqs[i] for i in chain], [plan.sizes[i] for i in chain], hedges, passes, plan.stop_drafting
            )
            for k, i in enumerate(chain):
                trees[i], last[i] = out.trees[k], out.last_logits[k]
        tree = [i for i, s in enumerate(seqs) if s.spec.mode is SpecMode.TREE]
        if tree:
            shapes = [_shape(seqs[i].spec, plan.sizes[i], rooms[i]) for i in tree]
            for i, t in zip(tree, self.trees.propose([seqs[i] for i in tree], shapes, passes)):
                trees[i] = t
        return Drafts(trees, last, passes)

    def hedge(self, seqs: Seq[DraftSequence], drafts: Drafts) -> list[list[Hedge]]:
        """While the target verifies: hedge branches for every chain that drafted (empty lists
        for the rest); each branch may draft as many tokens as its chain's configured size."""
        out: list[list[Hedge]] = [[] for _ in seqs]
        idx = [i for i, s in enumerate(seqs) if s.spec.mode is SpecMode.CHAIN and drafts.trees[i].num_draft_tokens]
        if idx and self.brancher is not None:
            found = self.brancher.hedge(
                [seqs[i] for i in idx],
                [drafts.trees[i] for i in idx],
                [drafts.last_logits[i] for i in idx],
                [seqs[i].spec.draft_tokens for i in idx],
                drafts.passes,
            )
            for i, h in zip(idx, found):
                out[i] = h
        return out

    @staticmethod
    def commit(seq: DraftSequence, tree: DraftTree, num_accepted: int) -> None:
        """Bring the draft's cache in line with what the target accepted (chains keep the rows of
        accepted draft tokens; trees keep nothing: the next catch-up feeds the accepted tokens)."""
        if seq.spec.mode is SpecMode.CHAIN:
            ChainProposer.commit(seq, tree, num_accepted)


def _fit(hedge: Hedge | None, depth: int) -> Hedge | None:
    """A hedge branch that came true last step, cut to what this step may verify."""
    if hedge is None or depth < 1:
        return None
    return Hedge(hedge.accepted, hedge.anchor, hedge.tail[:depth], hedge.probs[:depth])


def _shape(spec, budget: int, room: Room) -> TreeShape:
    depth = min(spec.tree_depth, room.depth, budget)
    static = static_shape(budget, depth, spec.tree_topk) if spec.tree_static else None
    return TreeShape(budget=budget, depth=depth, topk=spec.tree_topk, static=static)
