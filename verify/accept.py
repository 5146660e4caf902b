"""Lossless acceptance of a draft tree against the target's distributions (docs/algorithms.md §1, §2).

The walk starts at the root. At node u it tests u's children in order with the rule that matches
how they were generated (``ChildRule``); the first accepted child becomes u and the walk goes on.
When every child is rejected it emits a correction token from the residual; at a leaf it emits a
bonus token from the target's own distribution. Under greedy decoding the target distribution is
one-hot, and the walk reduces to "follow the child whose token is argmax p(u)".

``node_outcomes`` computes, exactly, what one node does: the probability that each child is the
accepted one and the residual distribution if none is. Production draws one outcome from it; the
exactness tests enumerate it. Both therefore check the same code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from hedgerow.verify.sampling import SamplingParams, sample, warp_probs
from hedgerow.verify.tree import ChildRule, DraftTree


@dataclass
class NodeOutcome:
    accept_probs: torch.Tensor  # [k] P(child j, in test order, is the accepted one)
    residual: torch.Tensor  # [vocab] distribution of the correction token if all k are rejected

    @property
    def reject_prob(self) -> torch.Tensor:
        return (1.0 - self.accept_probs.sum()).clamp(min=0.0)


def _normalise(r: torch.Tensor, fallback: torch.Tensor) -> torch.Tensor:
    # A zero residual only happens where the rejection itself has probability zero.
    total = r.sum()
    return r / total if float(total) > 0.0 else fallback


def node_outcomes(
    p: torch.Tensor,
    child_tokens: Sequence[int],
    rule: ChildRule,
    q: torch.Tensor | None,
    point_mass: Sequence[bool] | None = None,
) -> NodeOutcome:
    """Exact outcome distribution of recursive rejection sampling at one node.

    p: [vocab] target distribution at the node; q: [vocab] the draft distribution the children
    were drawn from (unused for POINT_MASS). Rules, per docs/algorithms.md §2.1:
    - POINT_MASS: accept x w.p. r[x]; on rejection zero r[x] and renormalise.
    - IID: accept x w.p. min(1, r[x] / q[x]); on rejection r = norm(max(r - q, 0)).
    - WITHOUT_REPLACEMENT: as IID, with q' = q with the already-rejected tokens zeroed and renormalised.
    ``point_mass[j]``: child j was proposed deterministically whatever ``rule`` says (an n-gram
    node): it takes the POINT_MASS step against the current residual and leaves the proposal of
    the ruled children as it is, since they were not drawn against it (the mixed rule, §2.7).
    """
    dtype = torch.promote_types(p.dtype, torch.float32)  # fp32 at least; fp64 stays fp64 (exactness tests)
    r = p.to(dtype)
    fixed = [True] * len(child_tokens) if rule is ChildRule.POINT_MASS else (point_mass or [False] * len(child_tokens))
    proposal = None if all(fixed) else q.to(device=r.device, dtype=dtype)
    survive = torch.ones((), device=r.device, dtype=dtype)
    accept = []
    for x, point in zip(child_tokens, fixed):
        if point:
            a = r[x].clamp(max=1.0)
            rejected = r.clone()
            rejected[x] = 0.0
        else:
            qx = proposal[x]
            a = torch.where(qx > 0, r[x] / qx.clamp(min=1e-30), (r[x] > 0).to(dtype)).clamp(max=1.0)
            rejected = (r - proposal).clamp(min=0.0)
        accept.append(survive * a)
        survive = survive * (1.0 - a)
        r = _normalise(rejected, r)
        if rule is ChildRule.WITHOUT_REPLACEMENT and not point:
            proposal = proposal.clone()
            proposal[x] = 0.0
            proposal = _normalise(proposal, proposal)
    probs = torch.stack(accept) if accept else torch.zeros(0, device=r.device, dtype=dtype)
    return NodeOutcome(accept_probs=probs, residual=r)


@dataclass(frozen=True)
class Acceptance:
    path: list[int]  # accepted node indices from the root: [0, i1, ..., im]
    tokens: list[int]  # emitted tokens: the m accepted draft tokens, then the correction or bonus token
    logprobs: list | None = None  # per emitted token, the target's (verify/logprobs.py), when asked

    @property
    def num_accepted(self) -> int:
        return len(self.path) - 1


def greedy_walk(tree: DraftTree, argmax: list[int]) -> Acceptance:
    """Follow the child whose token is the target's argmax; emit the argmax where none is."""
    tokens = tree.tokens.tolist()
    u, path, out = 0, [0], []
    while True:
        target = argmax[u]
        nxt = next((c for c in tree.children[u] if tokens[c] == target), None)
        out.append(target)
        if nxt is None:
            return Acceptance(path, out)
        path.append(nxt)
        u = nxt


def sampling_walk(
    tree: DraftTree, p: torch.Tensor, generator: torch.Generator | None
) -> Acceptance:
    """Recursive rejection sampling down the tree. p: [N, vocab] warped target distributions."""
    tokens = tree.tokens.tolist()
    u, path, out = 0, [0], []
    while True:
        children = tree.children[u]
        if not children:
            out.append(int(sample(p[u], generator)))  # bonus token
            return Acceptance(path, out)
        q = None if tree.rule is ChildRule.POINT_MASS else tree.draft_probs[u]
        outcome = node_outcomes(p[u], [tokens[c] for c in children], tree.rule, q, tree.point_masses(u))
        choice = int(sample(torch.cat([outcome.accept_probs, outcome.reject_prob[None]]), generator))
        if choice == len(children):
            out.append(int(sample(outcome.residual, generator)))  # correction token
            return Acceptance(path, out)
        u = children[choice]
        path.append(u)
        out.append(tokens[u])


def accept(
    trees: Sequence[DraftTree],
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
) -> list[Acceptance]:
    """Accept every tree of a batch. logits: [B, N, vocab] from one target pass over the flat batch."""
    results: list[Acceptance | None] = [None] * len(trees)
    greedy = [i for i, sp in enumerate(params) if sp.greedy]
    if greedy:
        argmax = logits[greedy].argmax(-1).tolist()  # one device->host copy for every greedy row
        for row, i in zip(argmax, greedy):
            results[i] = greedy_walk(trees[i], row)
    for i, sp in enumerate(params):
        if not sp.greedy:
            p = warp_probs(logits[i, : trees[i].num_nodes], sp)
            results[i] = sampling_walk(trees[i], p, generators[i])
    return results  # type: ignore[return-value]
