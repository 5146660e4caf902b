"""Draft-free proposals: prompt lookup over a sequence's own text, and a server-wide pool.

The n-gram proposer finds the longest suffix of the committed tokens (n from ``ngram_max`` down to
``ngram_min``) that occurred earlier, in the prompt or the output, and proposes the tokens that
followed it. It costs no model pass, only the verify tokens it adds. Several earlier occurrences
give several continuations (distinct, longest n first, then most recent first), which a tree
holds as sibling branches; the draft model's tree or chain takes them in as extra branches where
they leave it (``graft``, the hybrid proposer).

Every lookup is a dictionary hit: each sequence keeps an index from every n-gram of its text to
the positions that followed it, extended as tokens are committed, so a step costs the same at a
context of ten tokens or of thousands. When the sequence's own text has no match, the pool of
n-grams from recently finished outputs is asked (``--ngram-pool N`` entries, least recently used
first out).

Lossless: a continuation depends only on committed tokens (and, when grafted, on the draft
model's tokens), never on the target's verdict, so each n-gram node is a point mass on its token
and the walk verifies it with the mixed rule of docs/algorithms.md §2.7.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from typing import Sequence as Seq

import torch

from hedgerow.drafting.base import DraftSequence
from hedgerow.drafting.spec import SpecMode
from hedgerow.verify.tree import DraftTree

Continuation = tuple[int, ...]
SCAN = 8  # earlier occurrences looked at per n-gram: the most recent ones, however repetitive the text


def follow(tokens: Seq[int], start: int, length: int) -> Continuation:
    """The ``length`` tokens from ``start`` on; past the end the text from ``start`` repeats (a
    match of the suffix at ``start`` says the text is periodic with period ``len - start``)."""
    run = tokens[start:]
    if len(run) >= length:
        return tuple(run[:length])
    return tuple((run * (length // len(run) + 1))[:length])


class NgramIndex:
    """Every n-gram (n in [lo, hi]) of one sequence's committed tokens, mapped to the positions of
    the tokens that followed it, oldest first. ``update`` indexes only what was committed since."""

    def __init__(self, lo: int, hi: int):
        self.lo, self.hi = min(lo, hi), hi
        self.followers: dict[Continuation, list[int]] = {}
        self.covered = 1  # positions [1, covered) are indexed as followers

    def update(self, tokens: Seq[int]) -> None:
        for e in range(self.covered, len(tokens)):
            for n in range(self.lo, min(self.hi, e) + 1):
                self.followers.setdefault(tuple(tokens[e - n : e]), []).append(e)
        self.covered = max(self.covered, len(tokens))

    def find(self, tokens: Seq[int], depth: int, branches: int) -> list[Continuation]:
        """Up to ``branches`` distinct continuations of ``depth`` tokens: longest matching suffix
        first, most recent occurrence first. The current suffix is never its own match: its
        follower is not committed yet, so it is not indexed."""
        out: list[Continuation] = []
        for n in range(min(self.hi, len(tokens)), self.lo - 1, -1):
            for e in reversed(self.followers.get(tuple(tokens[len(tokens) - n :]), ())[-SCAN:]):
                c = follow(tokens, e, depth)
                if c not in out:
                    out.append(c)
                    if len(out) == branches:
                        return out
        return out


class NgramPool:
    """Server-wide: n-grams of recently finished outputs and the ``span`` tokens that followed
    each, at most ``size`` entries (a few hundred bytes each: two short tuples and an ordered
    dictionary's link), the least recently used dropped first. Asked only where a sequence's own
    text has no match."""

    def __init__(self, size: int, span: int = 16):
        self.size, self.span = size, span
        self.entries: OrderedDict[Continuation, Continuation] = OrderedDict()

    def add(self, tokens: Seq[int], start: int, lo: int, hi: int) -> None:
        """The n-grams followed by a token of ``tokens[start:]`` (an output), newest last."""
        for e in range(max(start, 1), len(tokens)):
            for n in range(min(lo, hi), min(hi, e) + 1):
                key = tuple(tokens[e - n : e])
                self.entries[key] = tuple(tokens[e : e + self.span])
                self.entries.move_to_end(key)
        while len(self.entries) > self.size:
            self.entries.popitem(last=False)

    def find(self, tokens: Seq[int], lo: int, hi: int, depth: int) -> Continuation | None:
        for n in range(min(hi, len(tokens)), min(lo, hi) - 1, -1):
            key = tuple(tokens[len(tokens) - n :])
            found = self.entries.get(key)
            if found is not None:
                self.entries.move_to_end(key)
                return found[:depth]
        return None


class NgramProposer:
    """Continuations for each sequence: its own index first, then the pool."""

    def __init__(self, pool_size: int = 0):
        self.pool = NgramPool(pool_size) if pool_size > 0 else None
        self._index: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # sequence -> NgramIndex

    def find(self, seq: DraftSequence, depth: int) -> tuple[Continuation, ...]:
        """What n-gram lookup offers ``seq`` this step, best first: one continuation for a chain,
        up to ``tree_topk`` for a tree, each at most ``depth`` tokens (and the tree's depth)."""
        spec = seq.spec
        if not spec.uses_ngram or depth < 1:
            return ()
        tree = spec.mode is SpecMode.TREE
        depth = min(depth, spec.tree_depth if tree else spec.draft_tokens)
        if depth < 1:
            return ()
        index = self._index.get(seq)
        if index is None:
            index = self._index[seq] = NgramIndex(spec.ngram_min, spec.ngram_max)
        index.update(seq.tokens)
        found = index.find(seq.tokens, depth, spec.tree_topk if tree else 1)
        if not found and self.pool is not None:
            hit = self.pool.find(seq.tokens, spec.ngram_min, spec.ngram_max, depth)
            found = [hit] if hit else []
        return tuple(found)

    def retire(self, seq: DraftSequence) -> None:
        """A finished sequence, whatever its proposer: its output's n-grams join the pool."""
        if self.pool is not None:
            self.pool.add(seq.tokens, seq.prompt_len, seq.spec.ngram_min, seq.spec.ngram_max)


def graft(tree: DraftTree, continuations: Seq[Continuation], budget: int) -> DraftTree:
    """``tree`` with the continuations merged in as a trie of point-mass nodes, at most ``budget``
    new ones: each follows the tree while the tree has a child with its next token (the model's
    node, then, stands for both), and leaves it as a new child numbered after every existing node,
    so at every node the n-gram children are tested after the draft model's (docs/algorithms.md §2.7).
    A continuation is cut where the budget runs out."""
    tokens, parents = tree.tokens.tolist(), tree.parents.tolist()
    first = len(tokens)
    child: dict[tuple[int, int], int] = {}
    for i in range(first - 1, 0, -1):  # the first child with a token is the one the greedy walk takes
        child[(parents[i], tokens[i])] = i
    for c in continuations:
        u = 0
        for tok in c:
            v = child.get((u, tok))
            if v is None:
                if len(tokens) - first >= budget:
                    break
                v = child[(u, tok)] = len(tokens)
                tokens.append(tok)
                parents.append(u)
            u = v
    if len(tokens) == first:
        return tree
    probs = tree.draft_probs
    if probs is not None:
        probs = torch.cat([probs, probs.new_zeros(len(tokens) - first, probs.shape[1])])
    return DraftTree(torch.tensor(tokens), torch.tensor(parents), tree.rule, probs, first)
