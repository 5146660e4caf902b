"""The proposer the engine calls: one step's drafts for a batch of chain and tree sequences.

Each sequence's ``SpecParams.proposer`` says where its drafts come from: the draft model
(``model``), n-gram lookup (``ngram``, no model pass, drafting/ngram.py), or both (``hybrid``:
the model's chain or tree with the n-gram continuations grafted in as extra branches, all
verified in the same target pass). A server without a draft model proposes by n-gram only.

``propose`` returns a ``Drafts`` value with everything the rest of the step needs from drafting:
the trees to verify, the chains' last draft logits (the brancher hedges against their rejection),
the token count of every draft pass (the cost policy prices the draft phase from them), and the
n-gram continuations each tree took in. A hedge branch that came true last step (``ready``) is
this step's chain at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence as Seq

import torch

from hedgerow.drafting.base import DraftSequence
from hedgerow.drafting.branch import Brancher, Hedge
from hedgerow.drafting.chain import ChainProposer
from hedgerow.drafting.draft_model import DraftModel
from hedgerow.drafting.ngram import Continuation, NgramProposer, graft
from hedgerow.drafting.plan import Room, StepPlan
from hedgerow.drafting.spec import SpecMode
from hedgerow.drafting.tree import TreeProposer, TreeShape, static_shape
from hedgerow.verify.tree import DraftTree


@dataclass
class Drafts:
    trees: list[DraftTree]  # one per sequence; the root alone where nothing was drafted
    last_logits: list[torch.Tensor | None]  # chains: the draft's logits at the last draft token
    passes: list[int]  # tokens of each draft pass, in order
    ngram: list[tuple[Continuation, ...]]  # per sequence: the n-gram continuations its tree took in, as cut


class Proposer:
    def __init__(self, draft: DraftModel | None, alternatives: int | None = None, ngram_pool: int = 0):
        """``draft``: None on a server without a draft model (n-gram proposals only).
        ``alternatives``: None, no hedging; 0, hedge the continuation (pearl); k > 0, also k
        alternatives to the last draft token (branch). ``ngram_pool``: entries of the server-wide
        pool of n-grams from recent outputs (0: none)."""
        self.draft = draft
        self.chains = ChainProposer(draft) if draft is not None else None
        self.trees = TreeProposer(draft) if draft is not None else None
        self.brancher = Brancher(draft, alternatives) if draft is not None and alternatives is not None else None
        self.ngram = NgramProposer(ngram_pool)

    def propose(
        self, seqs: Seq[DraftSequence], plan: StepPlan, rooms: Seq[Room], ready: Mapping[DraftSequence, Hedge]
    ) -> Drafts:
        trees = [DraftTree.root_only(s.tokens[-1]) for s in seqs]
        last: list[torch.Tensor | None] = [None] * len(seqs)
        passes: list[int] = []
        model = [i for i, s in enumerate(seqs) if s.spec.uses_model]
        chain = [i for i in model if seqs[i].spec.mode is SpecMode.CHAIN]
        if chain:
            hedges = [_fit(ready.get(seqs[i]), rooms[i].depth) for i in chain]
            out = self.chains.propose(
                [seqs[i] for i in chain], [plan.sizes[i] for i in chain], hedges, passes, plan.stop_drafting
            )
            for k, i in enumerate(chain):
                trees[i], last[i] = out.trees[k], out.last_logits[k]
        tree = [i for i in model if seqs[i].spec.mode is SpecMode.TREE]
        if tree:
            shapes = [_shape(seqs[i].spec, plan.sizes[i], rooms[i]) for i in tree]
            for i, t in zip(tree, self.trees.propose([seqs[i] for i in tree], shapes, passes)):
                trees[i] = t
        offered = []
        for i, room in enumerate(rooms):
            size = min(plan.ngram[i] if plan.ngram else 0, room.rows - trees[i].num_draft_tokens)
            offered.append(tuple(c[:size] for c in room.ngram) if size > 0 else ())
            if offered[i]:
                trees[i] = graft(trees[i], offered[i], size)
        return Drafts(trees, last, passes, offered)

    def hedge(self, seqs: Seq[DraftSequence], drafts: Drafts) -> list[list[Hedge]]:
        """While the target verifies: hedge branches for every chain the draft model drafted
        (empty lists for the rest), on the outcomes of the model's own chain (n-gram nodes grafted
        to it are left out: a hedge hits only where the accepted path is the model's); each branch
        may draft as many tokens as its chain's configured size."""
        out: list[list[Hedge]] = [[] for _ in seqs]
        idx = [i for i in range(len(seqs)) if drafts.last_logits[i] is not None]
        if idx and self.brancher is not None:
            found = self.brancher.hedge(
                [seqs[i] for i in idx],
                [_model_chain(drafts.trees[i]) for i in idx],
                [drafts.last_logits[i] for i in idx],
                [seqs[i].spec.draft_tokens for i in idx],
                drafts.passes,
            )
            for i, h in zip(idx, found):
                out[i] = h
        return out

    def commit(self, seq: DraftSequence, tree: DraftTree, path: Seq[int]) -> None:
        """Bring the draft's cache in line with what the target accepted (chains keep the rows of
        the accepted tokens the model drafted; trees keep nothing: the next catch-up feeds the
        accepted tokens)."""
        if seq.spec.mode is SpecMode.CHAIN and seq.spec.uses_model:
            ChainProposer.commit(seq, tree.ruled - 1, sum(1 for u in path[1:] if u < tree.ruled))

    def retire(self, seqs: Seq[DraftSequence]) -> None:
        """Finished sequences: their outputs feed the n-gram pool."""
        for s in seqs:
            self.ngram.retire(s)


def _model_chain(tree: DraftTree) -> DraftTree:
    """The draft model's chain in a chain with n-gram nodes grafted to it (its first nodes)."""
    if tree.point_mass_from is None:
        return tree
    r = tree.ruled
    probs = tree.draft_probs[:r] if tree.draft_probs is not None else None
    return DraftTree(tree.tokens[:r], tree.parents[:r], tree.rule, probs)


def _fit(hedge: Hedge | None, depth: int) -> Hedge | None:
    """A hedge branch that came true last step, cut to what this step may verify."""
    if hedge is None or depth < 1:
        return None
    return Hedge(hedge.accepted, hedge.anchor, hedge.tail[:depth], hedge.probs[:depth])


def _shape(spec, budget: int, room: Room) -> TreeShape:
    depth = min(spec.tree_depth, room.depth, budget)
    static = static_shape(budget, depth, spec.tree_topk) if spec.tree_static else None
    return TreeShape(budget=budget, depth=depth, topk=spec.tree_topk, static=static)
