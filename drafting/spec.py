"""What a request asks to be drafted: the speculation mode, its proposer and its sizes.

A value of the request (each may carry its own, or take the server's default); the draft-size
policy decides each step how much of it to use, and the proposers draft it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace


class SpecMode(str, enum.Enum):
    PLAIN = "plain"  # plain decoding: one target pass per token, no draft
    CHAIN = "chain"
    TREE = "tree"


class ProposerKind(str, enum.Enum):
    """Where a request's draft tokens come from (docs/glossary.md, "proposer")."""

    MODEL = "model"  # the draft model alone
    NGRAM = "ngram"  # prompt lookup: copies what followed the text's own suffix earlier (no model pass)
    HYBRID = "hybrid"  # the draft model's chain or tree, n-gram continuations grafted in as extra branches


# The bounds, inclusive, of each size a request may ask for. One table for every surface: the
# command line, the gRPC service and the OpenAI proxy's extension check against it (through
# ``SpecParams`` or ``check_spec_size``), so a value one accepts the others accept too. The upper
# bounds keep one verify pass bounded (a chain verifies ``draft_tokens + 1`` tokens, a tree
# ``tree_budget + 1``) and lie far past the sizes where drafting pays; a tree's depth and its
# children per node share the chain's bound.
SPEC_LIMITS: dict[str, tuple[int, int]] = {
    "draft_tokens": (0, 64),
    "tree_budget": (0, 1024),
    "tree_depth": (0, 64),
    "tree_topk": (1, 64),
    "ngram_max": (1, 16),
    "ngram_min": (1, 16),
}


def check_spec_size(name: str, value: int) -> int:
    """``value`` when it is an integer within ``SPEC_LIMITS[name]``; otherwise a ValueError whose
    message starts with ``name`` (each surface maps it to its own field or flag name)."""
    lo, hi = SPEC_LIMITS[name]
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer in [{lo}, {hi}], got {value!r}")
    if not lo <= value <= hi:
        raise ValueError(f"{name} must be in [{lo}, {hi}], got {value}")
    return value


@dataclass(frozen=True)
class SpecParams:
    mode: SpecMode = SpecMode.CHAIN
    draft_tokens: int = 4  # gamma, for chains
    tree_budget: int = 16  # draft nodes below the root, for trees
    tree_depth: int = 6  # levels below the root, for trees
    tree_topk: int = 4  # children per expanded node, for trees
    tree_static: bool = False  # a fixed top-k rank shape instead of a dynamic tree
    # None: the engine's default, resolved when the request is admitted (``resolve``)
    proposer: ProposerKind | None = None
    # n-gram lookup: the longest suffix of n tokens, n from ngram_max down to ngram_min, that
    # occurred before (an ngram_min above ngram_max means ngram_max alone)
    ngram_max: int = 4
    ngram_min: int = 2

    def __post_init__(self) -> None:
        for name in SPEC_LIMITS:
            check_spec_size(name, getattr(self, name))
        if self.proposer is not None:
            names = [k.value for k in ProposerKind]
            if self.proposer not in names:
                raise ValueError(f"proposer must be one of {', '.join(names)}, got {self.proposer!r}")
            object.__setattr__(self, "proposer", ProposerKind(self.proposer))  # "ngram" -> ProposerKind.NGRAM

    @property
    def configured_size(self) -> int:
        """Draft tokens of a chain, nodes of a tree, 0 for plain decoding."""
        return {SpecMode.CHAIN: self.draft_tokens, SpecMode.TREE: self.tree_budget}.get(self.mode, 0)

    @property
    def uses_model(self) -> bool:
        """Whether the draft model drafts for this request (an unresolved proposer counts as the model)."""
        return self.mode is not SpecMode.PLAIN and self.proposer is not ProposerKind.NGRAM

    @property
    def uses_ngram(self) -> bool:
        return self.mode is not SpecMode.PLAIN and self.proposer in (ProposerKind.NGRAM, ProposerKind.HYBRID)

    def resolve(self, has_draft: bool) -> "SpecParams":
        """This request's settings with the engine's default proposer filled in: ``hybrid`` on a
        server with a draft model, ``ngram`` on one without."""
        if self.proposer is not None:
            return self
        return replace(self, proposer=ProposerKind.HYBRID if has_draft else ProposerKind.NGRAM)
