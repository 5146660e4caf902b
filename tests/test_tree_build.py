"""The tensor-built token trees of drafting/tree.py against the per-node construction they
replaced, kept below verbatim as the reference: for the same inputs, the same tokens, parents,
child rule and draft_probs, and the same draft passes, step after step; greedy, sampled (several
seeds and warps, the same draws from each sequence's generator) and static trees, alone and in
ragged mixed batches, on tiny random drafts and on formula drafts (many ties; a wide vocabulary)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence as Seq

import pytest
import torch

from hedgerow.drafting.base import DraftSequence
from hedgerow.drafting.draft_model import DraftModel, sampled_children, top_children
from hedgerow.drafting.spec import SpecMode, SpecParams
from hedgerow.drafting.tree import TreeProposer, TreeShape, static_shape
from hedgerow.drafting.tree_build import exact_topk, level_batch
from hedgerow.verify.flatten import pack
from hedgerow.verify.sampling import SamplingParams
from hedgerow.verify.tree import ChildRule, DraftTree
from tests.tiny import VOCAB, runner, tiny_model

pytestmark = pytest.mark.engine


# --- the reference: drafting/tree.py's per-node construction, verbatim but for the class name ---
# (TreeShape and static_shape are unchanged and imported above.)
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


class ReferenceTreeProposer:
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


# --- the comparison ---------------------------------------------------------------------------
class Sequence:
    """What the proposers read of a sequence; its own seeded generator per stream and device."""

    def __init__(self, tokens: list[int], slot: int, sampling: SamplingParams, seed: int):
        self.request_id = f"seq{slot}"
        self.tokens = list(tokens)
        self.prompt_len = len(tokens)
        self.spec = SpecParams(mode=SpecMode.TREE)
        self.draft_slot = slot
        self.draft_len = 0
        self.sampling = sampling
        self.seed = seed
        self._generators: dict = {}

    def generator(self, device: torch.device, stream: str = "target") -> torch.Generator:
        key = (stream, torch.device(device))
        if key not in self._generators:
            self._generators[key] = torch.Generator(device=device).manual_seed(self.seed + 7919 * (stream == "draft"))
        return self._generators[key]


@dataclass
class Case:
    prompt: list[int]
    shape: TreeShape
    sampling: SamplingParams = SamplingParams()
    seed: int = 0


def build_steps(proposer_cls, draft: DraftModel, slots: list[int], cases: list[Case], steps: int):
    """Trees and draft passes of ``steps`` steps, every sequence starting with an empty draft
    cache; between steps each sequence commits its first child (or a fixed token), and every
    other step one more token, so catch-ups vary."""
    seqs = [Sequence(c.prompt, slot, c.sampling, c.seed) for c, slot in zip(cases, slots)]
    proposer = proposer_cls(draft)
    out = []
    for step in range(steps):
        passes: list[int] = []
        trees = proposer.propose(seqs, [c.shape for c in cases], passes)
        out.append((trees, passes))
        for s, t in zip(seqs, trees):
            s.tokens.append(int(t.tokens[1]) if t.num_nodes > 1 else 7)
            if step % 2:
                s.tokens.append(11)
    return out


def assert_same_trees(draft: DraftModel, slots: list[int], cases: list[Case], steps: int = 3) -> None:
    want = build_steps(ReferenceTreeProposer, draft, slots, cases, steps)
    got = build_steps(TreeProposer, draft, slots, cases, steps)
    for step, ((ref_trees, ref_passes), (trees, passes)) in enumerate(zip(want, got)):
        assert passes == ref_passes, f"step {step}: draft passes {passes} != {ref_passes}"
        for i, (ref, tree) in enumerate(zip(ref_trees, trees)):
            where = f"step {step}, sequence {i}"
            assert torch.equal(tree.tokens, ref.tokens), f"{where}: tokens {tree.tokens} != {ref.tokens}"
            assert torch.equal(tree.parents, ref.parents), f"{where}: parents {tree.parents} != {ref.parents}"
            assert tree.rule is ref.rule, where
            if ref.draft_probs is None:
                assert tree.draft_probs is None, where
            else:
                assert tree.draft_probs.dtype == ref.draft_probs.dtype, where
                assert torch.equal(tree.draft_probs, ref.draft_probs), f"{where}: draft_probs differ"
    assert any(t.num_nodes > 1 for trees, _ in want for t in trees), "nothing was drafted"


@pytest.fixture(scope="module")
def tiny_draft():
    run = runner(tiny_model("llama", seed=1, layers=1, hidden=32), slots=8, max_len=128)
    return run, [run.cache.allocate() for _ in range(6)]


PROMPTS = [[5, 6, 7, 8, 9], [10, 11], [3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13], [40, 41, 42], [2], [60, 61, 62, 63]]
WARPS = [
    SamplingParams(temperature=0.8),
    SamplingParams(temperature=1.0, top_k=5),
    SamplingParams(temperature=0.7, top_p=0.9),
    SamplingParams(temperature=1.0, top_k=2),  # fewer non-zero tokens than children wanted
    SamplingParams(temperature=1.3, top_k=20, top_p=0.8),
]
# (40, 3, 4): wide frontiers; (10, 3, 4): the budget left cuts a node's children
DYNAMIC = [TreeShape(16, 6, 4), TreeShape(12, 4, 3), TreeShape(6, 2, 2), TreeShape(40, 3, 4), TreeShape(10, 3, 4)]
IRREGULAR = ((0,), (2,), (0, 0), (0, 1), (1, 0), (0, 0, 5))  # not closed under siblings; ranks outside the shape


@pytest.mark.parametrize("vocab", [VOCAB, VOCAB + 3, VOCAB - 8], ids=["same", "padded", "cut"])
def test_greedy_dynamic_trees_are_the_reference_trees(tiny_draft, vocab):
    run, slots = tiny_draft
    cases = [Case(PROMPTS[i], DYNAMIC[i % len(DYNAMIC)]) for i in range(5)]
    assert_same_trees(DraftModel(run, vocab), slots, cases)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("vocab", [VOCAB, VOCAB + 3], ids=["same", "padded"])
def test_sampled_dynamic_trees_are_the_reference_trees(tiny_draft, seed, vocab):
    run, slots = tiny_draft
    cases = [
        Case(PROMPTS[i], DYNAMIC[i % len(DYNAMIC)], WARPS[(i + seed) % len(WARPS)], seed * 10 + i) for i in range(5)
    ]
    assert_same_trees(DraftModel(run, vocab), slots, cases)


@pytest.mark.parametrize("greedy", [True, False], ids=["greedy", "sampled"])
def test_static_trees_are_the_reference_trees(tiny_draft, greedy):
    run, slots = tiny_draft
    shapes = [static_shape(16, 6, 4), static_shape(10, 4, 3), IRREGULAR, static_shape(5, 1, 4)]
    cases = [
        Case(PROMPTS[i], TreeShape(len(s), max(map(len, s)), 4, s), SamplingParams() if greedy else WARPS[i], i)
        for i, s in enumerate(shapes)
    ]
    assert_same_trees(DraftModel(run, VOCAB), slots, cases)


def test_mixed_batch_trees_are_the_reference_trees(tiny_draft):
    """Greedy, sampled and static sequences in one batch, one that drafts nothing, one of depth 1."""
    run, slots = tiny_draft
    cases = [
        Case(PROMPTS[0], TreeShape(16, 6, 4)),
        Case(PROMPTS[1], TreeShape(16, 6, 4), WARPS[0], 3),
        Case(PROMPTS[2], TreeShape(10, 4, 3, static_shape(10, 4, 3)), WARPS[2], 4),
        Case(PROMPTS[3], TreeShape(0, 0, 4)),
        Case(PROMPTS[4], TreeShape(12, 1, 4), WARPS[1], 5),
        Case(PROMPTS[5], TreeShape(8, 3, 2, static_shape(8, 3, 2))),
    ]
    assert_same_trees(DraftModel(run, VOCAB), slots, cases, steps=4)


def test_trees_near_the_end_of_the_draft_cache_are_the_reference_trees():
    """Few rows left: the cache's room cuts the frontiers, then stops the tree."""
    run = runner(tiny_model("llama", seed=1, layers=1, hidden=32), slots=4, max_len=40)
    slots = [run.cache.allocate() for _ in range(3)]
    long = list(range(3, 31))
    cases = [Case(long, TreeShape(16, 6, 4)), Case(long[:-1], TreeShape(16, 6, 4), WARPS[4], 1),
             Case(long, TreeShape(16, 6, 4, static_shape(16, 6, 4)))]
    assert_same_trees(DraftModel(run, VOCAB), slots, cases, steps=4)


class FormulaRunner:
    """A stand-in draft whose logits are a formula of the last token and its position. Rounded to
    integers: exact ties among a node's children, among scores and in the rerank. Unrounded over a
    wide vocabulary: the chunked top-k (tree_build.exact_topk) answers without its fallback."""

    device = torch.device("cpu")

    def __init__(self, vocab: int, rounded: bool, max_len: int = 64):
        self.vocab, self.rounded, self.max_len = vocab, rounded, max_len

    def forward(self, slots, flat):
        return torch.stack([flat.tokens, flat.positions], -1).double()  # [B, N, 2]

    def extend(self, slots, prefix_lens, chains, chunk):
        return torch.tensor([[c[-1], p + len(c) - 1] for p, c in zip(prefix_lens, chains)], dtype=torch.float64)

    def logits(self, hidden):
        tok, pos = hidden[..., :1], hidden[..., 1:]
        v = torch.arange(self.vocab)
        logits = torch.sin(tok * 1.7 + pos * 0.3 + v * 0.9) * 2 + torch.cos(v * tok)
        return (logits.round() if self.rounded else logits).float()


@pytest.mark.parametrize("greedy", [True, False], ids=["greedy", "sampled"])
@pytest.mark.parametrize("vocab,rounded", [(24, True), (1024, True), (1024, False)], ids=["tied", "tied-wide", "wide"])
def test_trees_from_formula_logits_are_the_reference_trees(greedy, vocab, rounded):
    sampling = SamplingParams() if greedy else SamplingParams(temperature=0.9, top_k=6)
    cases = [Case([3, 4, 5], TreeShape(16, 6, 4), sampling, 1), Case([9], TreeShape(40, 3, 4), sampling, 2),
             Case([7, 8], TreeShape(10, 4, 3, static_shape(10, 4, 3)), sampling, 3)]
    assert_same_trees(DraftModel(FormulaRunner(vocab, rounded), vocab), [0, 1, 2], cases, steps=4)


def test_exact_topk_is_topk():
    gen = torch.Generator().manual_seed(0)
    for vocab in (128 * 7, 1000, 4096):
        x = torch.randn(6, vocab, generator=gen)
        x[1] = (x[1] * 2).round()  # ties
        x[2, 17] = float("nan")
        x[3, 5:] = float("-inf")
        x[4, 200] = x[4].max()  # a tie at the top
        for k in (1, 4, 6):
            want, (values, indices) = x.topk(k), exact_topk(x, k)
            assert indices == want.indices.tolist(), (vocab, k)
            torch.testing.assert_close(torch.tensor(values), want.values, rtol=0, atol=0, equal_nan=True)


def test_level_batch_is_the_tree_form_of_pack():
    gen = torch.Generator().manual_seed(0)
    for trial in range(18):
        b = 1 + trial % 3
        sizes = torch.randint(1, 5, (b,), generator=gen).tolist()
        extra = torch.randint(0, 9, (b,), generator=gen).tolist()
        lens = torch.randint(1, 30, (b,), generator=gen).tolist()
        depths = torch.randint(1, 7, (b,), generator=gen).tolist()
        tokens = [torch.randint(0, 100, (k,), generator=gen) for k in sizes]
        visible = [torch.rand(k, e + k, generator=gen) < 0.5 for k, e in zip(sizes, extra)]
        want = pack(tokens, [torch.full((k,), d) for k, d in zip(sizes, depths)], lens, visible, [p - 1 for p in lens])
        got = level_batch(tokens, depths, lens, visible)
        for name, value in want.__dict__.items():
            assert torch.equal(getattr(got, name), value), name
            assert getattr(got, name).dtype == value.dtype, name
