"""The draft tree: the one dataclass where drafting and verification meet.

Glossary (used across verify/ and drafting/):
- root: node 0, the last committed token. Its KV is not cached yet; the verify pass computes it.
- draft token: any other node, proposed by a drafter and checked by the target.
- accepted token: a draft token the acceptance rule kept.
- correction token: drawn from the residual distribution after every child of a node was rejected.
- bonus token: drawn from the target's distribution at a leaf the walk reached (nothing left to check).

A chain of gamma draft tokens is a tree whose nodes each have one child.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch


class ChildRule(enum.Enum):
    """How a node's children were produced; this decides the lossless acceptance rule.

    docs/algorithms.md (token trees): using the rule of another generation process is biased.
    """

    POINT_MASS = "point_mass"  # chosen deterministically (argmax / top-k): q is a point mass on each
    IID = "iid"  # independent draws from the node's draft distribution q
    WITHOUT_REPLACEMENT = "without_replacement"  # one draw without replacement from q (Gumbel-top-k)


@dataclass
class DraftTree:
    """One sequence's proposal. Nodes are in a topological order: ``parents[i] < i``.

    tokens:      [N] int64, tokens[0] is the root
    parents:     [N] int64, parents[0] == -1
    rule:        how every node's children were generated
    draft_probs: [N, vocab] fp32, row u = the distribution u's children were drawn from
                 (needed by IID and WITHOUT_REPLACEMENT; None for POINT_MASS)
    point_mass_from: nodes from this index on were proposed deterministically whatever ``rule``
                 says (n-gram lookups): each is a point mass on its own token. Numbered after
                 every node ``rule`` covers, each is tested after all its siblings that ``rule``
                 covers, the order the mixed rule needs (docs/algorithms.md §2.7). None: no such node.
    """

    tokens: torch.Tensor
    parents: torch.Tensor
    rule: ChildRule = ChildRule.POINT_MASS
    draft_probs: torch.Tensor | None = None
    point_mass_from: int | None = None
    children: list[list[int]] = field(init=False, repr=False)
    is_chain: bool = field(init=False, repr=False)

    def __post_init__(self) -> None:
        n = self.tokens.shape[0]
        if n < 1 or self.parents.shape != (n,) or int(self.parents[0]) != -1:
            raise ValueError("a draft tree needs a root (parents[0] == -1) and one parent per node")
        parents = self.parents.tolist()
        self.is_chain = all(p == i - 1 for i, p in enumerate(parents))  # each node the child of the one before
        self.children = [[] for _ in range(n)]
        for i in range(1, n):
            if not 0 <= parents[i] < i:
                raise ValueError(f"node {i} has parent {parents[i]}; parents must precede children")
            self.children[parents[i]].append(i)
        if self.rule is not ChildRule.POINT_MASS and n > 1 and self.draft_probs is None:
            raise ValueError(f"rule {self.rule.value} needs the draft distributions")
        if self.point_mass_from is not None and not 1 <= self.point_mass_from <= n:
            raise ValueError(f"point_mass_from {self.point_mass_from} is not a node of a tree of {n}")

    @property
    def ruled(self) -> int:
        """Nodes [0, ruled) follow ``rule``; the rest are point masses (n-gram nodes)."""
        return self.num_nodes if self.point_mass_from is None else self.point_mass_from

    def point_masses(self, u: int) -> list[bool]:
        """Per child of ``u``, in test order: whether it is a point mass whatever ``rule`` says."""
        return [c >= self.ruled for c in self.children[u]]

    def depths(self) -> torch.Tensor:
        """[N] depth of every node below the root."""
        depth = [0] * self.num_nodes
        for i, p in enumerate(self.parents.tolist()[1:], start=1):
            depth[i] = depth[p] + 1
        return torch.tensor(depth)

    @property
    def num_nodes(self) -> int:
        return self.tokens.shape[0]

    @property
    def num_draft_tokens(self) -> int:
        return self.tokens.shape[0] - 1

    @classmethod
    def root_only(cls, token: int) -> "DraftTree":
        return cls(torch.tensor([token]), torch.tensor([-1]))

    @classmethod
    def chain(
        cls, tokens: list[int], rule: ChildRule = ChildRule.POINT_MASS, draft_probs: torch.Tensor | None = None
    ) -> "DraftTree":
        """The one constructor of chains (each node has one child): drafted chains, hedge tails,
        and the plain token runs of prefill and catch-up."""
        return cls(torch.tensor(tokens, dtype=torch.long), torch.arange(len(tokens)) - 1, rule, draft_probs)
