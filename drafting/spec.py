"""What a request asks to be drafted: the speculation mode and its sizes.

A value of the request (each may carry its own, or take the server's default); the draft-size
policy decides each step how much of it to use, and the proposers draft it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class SpecMode(str, enum.Enum):
    PLAIN = "plain"  # plain decoding: one target pass per token, no draft
    CHAIN = "chain"
    TREE = "tree"


@dataclass(frozen=True)
class SpecParams:
    mode: SpecMode = SpecMode.CHAIN
    draft_tokens: int = 4  # gamma, for chains
    tree_budget: int = 16  # draft nodes below the root, for trees
    tree_depth: int = 6  # levels below the root, for trees
    tree_topk: int = 4  # children per expanded node, for trees
    tree_static: bool = False  # a fixed top-k rank shape instead of a dynamic tree

    def __post_init__(self) -> None:
        if self.draft_tokens < 0:
            raise ValueError(f"draft_tokens must be >= 0, got {self.draft_tokens}")
        if self.tree_budget < 0:
            raise ValueError(f"tree_budget must be >= 0, got {self.tree_budget}")
        if self.tree_depth < 0:
            raise ValueError(f"tree_depth must be >= 0, got {self.tree_depth}")
        if self.tree_topk < 1:
            raise ValueError(f"tree_topk must be >= 1, got {self.tree_topk}")

    @property
    def configured_size(self) -> int:
        """Draft tokens of a chain, nodes of a tree, 0 for plain decoding."""
        return {SpecMode.CHAIN: self.draft_tokens, SpecMode.TREE: self.tree_budget}.get(self.mode, 0)
