"""Exact output distributions of the acceptance rules, by enumeration on a tiny vocabulary.

For every prefix the target has a distribution p(.|prefix) and the drafter q(.|prefix), both
passed through the same warping (temperature, top-k, top-p). A generation process builds the
children of each tree node from q; the verification rule under test (``verify.accept.node_outcomes``,
the function production samples from) decides. We enumerate every drafted tree with its probability
and every outcome of the walk, and compare the distribution of the first T emitted tokens with the
target's own joint distribution. Tokens past the end of one step come from the target itself (what
the next step reproduces by induction).

The biased rules of docs/algorithms.md §2.5 (and the classic "resample from p" chain mistake) are run
through the same harness as negative controls: the harness must see their bias. So are the mixed
rule of §2.7 (draws from q beside n-gram point masses) and its three biased variants.
"""

import itertools
from collections import defaultdict

import pytest
import torch

from hedgerow.verify.accept import NodeOutcome, node_outcomes, sampling_walk
from hedgerow.verify.sampling import SamplingParams, warp_probs
from hedgerow.verify.tree import ChildRule, DraftTree

V = 5
T = 2  # compare the joint distribution of the first T emitted tokens


class Model:
    """A random next-token distribution per prefix, warped like the engine warps."""

    def __init__(self, seed: int, params: SamplingParams, sharp: float = 1.5):
        self.seed, self.params, self.sharp, self.cache = seed, params, sharp, {}

    def __call__(self, prefix: tuple) -> torch.Tensor:
        if prefix not in self.cache:
            g = torch.Generator().manual_seed(hash((self.seed,) + prefix) % 2**31)
            logits = torch.randn(V, generator=g, dtype=torch.float64) * self.sharp
            probs = warp_probs(logits, self.params).double()
            self.cache[prefix] = probs / probs.sum()  # warp works in fp32; the enumeration in fp64
        return self.cache[prefix]


def children_outcomes(q: torch.Tensor, k: int, how: str):
    """Every way the generation process can produce k children, with its probability."""
    if how == "iid":
        for tup in itertools.product(range(V), repeat=k):
            yield tup, float(torch.prod(q[list(tup)]))
    elif how == "wor":
        support = [x for x in range(V) if q[x] > 0]
        for tup in itertools.permutations(support, min(k, len(support))):
            prob, left = 1.0, 1.0
            for x in tup:
                prob *= float(q[x]) / left
                left -= float(q[x])
            yield tup, prob
    elif how == "topk":
        order = sorted(range(V), key=lambda x: (-float(q[x]), x))
        yield tuple(order[:k]), 1.0
    else:
        raise ValueError(how)


def emitted(p_model, q_model, prefix, level, shape, how, rule, outcomes_fn) -> dict:
    """Distribution of the tokens one step emits from a node at depth ``level``."""
    p = p_model(prefix)
    if level == len(shape):  # a leaf: the bonus token
        return {(x,): float(p[x]) for x in range(V) if p[x] > 0}
    q = q_model(prefix)
    out = defaultdict(float)
    for kids, prob in children_outcomes(q, shape[level], how):
        if prob == 0:
            continue
        oc = outcomes_fn(p, list(kids), rule, q)
        for j, x in enumerate(kids):
            a = float(oc.accept_probs[j])
            if a > 0:
                for seq, ps in emitted(p_model, q_model, prefix + (x,), level + 1, shape, how, rule, outcomes_fn).items():
                    out[(x,) + seq] += prob * a * ps
        rej = float(oc.reject_prob)
        for y in range(V):
            if oc.residual[y] > 0:
                out[(y,)] += prob * rej * float(oc.residual[y])
    return out


def first_tokens(dist: dict, p_model) -> dict:
    """Complete short outputs with the target's own distribution; marginalise to T tokens."""
    out = defaultdict(float)
    for seq, prob in dist.items():
        seq = seq[:T]
        if len(seq) == T:
            out[seq] += prob
        else:
            for rest in itertools.product(range(V), repeat=T - len(seq)):
                pr, ctx = prob, seq
                for x in rest:
                    pr *= float(p_model(ctx)[x])
                    ctx = ctx + (x,)
                out[ctx] += pr
    return out


def target_joint(p_model) -> dict:
    out = {}
    for seq in itertools.product(range(V), repeat=T):
        pr, ctx = 1.0, ()
        for x in seq:
            pr *= float(p_model(ctx)[x])
            ctx = ctx + (x,)
        out[seq] = pr
    return out


def max_error(shape, how, rule, params, outcomes_fn=node_outcomes, seeds=range(4)) -> float:
    worst = 0.0
    for s in seeds:
        p_model, q_model = Model(100 + s, params), Model(200 + s, params, sharp=1.0)
        got = first_tokens(emitted(p_model, q_model, (), 0, shape, how, rule, outcomes_fn), p_model)
        want = target_joint(p_model)
        assert abs(sum(got.values()) - 1.0) < 1e-9
        worst = max(worst, max(abs(got.get(k, 0.0) - v) for k, v in want.items()))
    return worst


WARPS = [
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=0.6, top_k=3),
    SamplingParams(temperature=1.4, top_p=0.7),
    SamplingParams(temperature=0.8, top_k=4, top_p=0.9),
]
EXACT = 1e-9


# --- chains (docs/algorithms.md §1) -------------------------------------------------------------
@pytest.mark.unit
@pytest.mark.parametrize("params", WARPS, ids=lambda p: f"t{p.temperature}-k{p.top_k}-p{p.top_p}")
@pytest.mark.parametrize("gamma", [1, 3])
def test_chain_rule_reproduces_the_target_exactly(params, gamma):
    assert max_error([1] * gamma, "iid", ChildRule.IID, params) < EXACT


@pytest.mark.unit
def test_chain_greedy_draft_with_point_mass_rule_is_exact():
    assert max_error([1, 1], "topk", ChildRule.POINT_MASS, WARPS[0]) < EXACT


def _resample_from_p(p, kids, rule, q) -> NodeOutcome:
    """The classic mistake: on rejection draw from p instead of the residual max(p - q, 0)."""
    oc = node_outcomes(p, kids, rule, q)
    return NodeOutcome(oc.accept_probs, p)


@pytest.mark.unit
def test_negative_control_resampling_from_p_is_biased():
    assert max_error([1, 1], "iid", ChildRule.IID, WARPS[0], outcomes_fn=_resample_from_p) > 1e-3


@pytest.mark.unit
def test_negative_control_argmax_draft_verified_with_softmax_is_biased():
    assert max_error([1, 1], "topk", ChildRule.IID, WARPS[0]) > 1e-3


# --- trees (docs/algorithms.md §2) --------------------------------------------------------------
@pytest.mark.unit
@pytest.mark.parametrize("params", WARPS[:3], ids=lambda p: f"t{p.temperature}-k{p.top_k}-p{p.top_p}")
@pytest.mark.parametrize(
    "how,rule,shape",
    [
        ("iid", ChildRule.IID, [2, 1]),
        ("iid", ChildRule.IID, [3]),
        ("wor", ChildRule.WITHOUT_REPLACEMENT, [2, 2]),
        ("wor", ChildRule.WITHOUT_REPLACEMENT, [3]),
        ("topk", ChildRule.POINT_MASS, [2, 2]),
        ("topk", ChildRule.POINT_MASS, [3, 1]),
    ],
)
def test_tree_rules_reproduce_the_target_exactly(how, rule, shape, params):
    assert max_error(shape, how, rule, params) < EXACT


@pytest.mark.unit
@pytest.mark.parametrize(
    "how,rule",
    [
        ("wor", ChildRule.IID),  # without-replacement children verified with a fixed q
        ("topk", ChildRule.IID),  # deterministic top-k children verified with the drafter's softmax
    ],
)
def test_negative_controls_wrong_rule_is_biased(how, rule):
    assert max_error([2, 1], how, rule, WARPS[0]) > 1e-3


# --- the sampling path itself -------------------------------------------------------------------
@pytest.mark.slow
def test_sampling_walk_draws_from_the_exact_distribution():
    """Monte Carlo check of the production walk (random draws) on one fixed two-level tree."""
    p_model, q_model = Model(7, WARPS[0]), Model(8, WARPS[0], sharp=1.0)
    # root with children (2, 4), node 1 (token 2) has child token 0
    tree = DraftTree(torch.tensor([3, 2, 4, 0]), torch.tensor([-1, 0, 0, 1]), ChildRule.IID,
                     torch.stack([q_model(()), q_model((2,)), torch.zeros(V, dtype=torch.float64),
                                  torch.zeros(V, dtype=torch.float64)]).float())
    p = torch.stack([p_model(()), p_model((2,)), p_model((4,)), p_model((2, 0))]).float()
    oc_root = node_outcomes(p[0], [2, 4], ChildRule.IID, tree.draft_probs[0])
    g = torch.Generator().manual_seed(3)
    n = 20000
    counts = torch.zeros(V)
    for _ in range(n):
        counts[sampling_walk(tree, p, g).tokens[0]] += 1
    # exact distribution of the first emitted token for this fixed tree
    want = oc_root.reject_prob * oc_root.residual
    want[2] += oc_root.accept_probs[0]
    want[4] += oc_root.accept_probs[1]
    assert (counts / n - want).abs().max() < 0.015


# --- mixed children: sampled by the draft model, deterministic from n-gram lookup (docs/algorithms.md §2.7)
def ngram_tokens(prefix: tuple, m: int) -> list[int]:
    """What lookup proposes after ``prefix``: m distinct tokens fixed by the prefix alone."""
    g = torch.Generator().manual_seed(hash((999,) + prefix) % 2**31)
    return torch.randperm(V, generator=g)[:m].tolist()


def mixed_emitted(p_model, q_model, prefix, level, shape, how, variant, under_ngram=False) -> dict:
    """Distribution of the tokens one hybrid step emits from a node at depth ``level``.

    ``shape[level] = (k, m)``: k children drawn from q (``how``), then m n-gram tokens, each
    grafted unless a drawn child already has it (the model's node stands for both); below an
    n-gram node only the n-gram continuation goes on (one token per level). ``variant`` says how
    the children are ordered and verified:
    - ``exact``: drawn children first by ``rule``, then the n-gram children as point masses;
    - ``ngram-first-kept``: every n-gram child first, kept even where a draw repeats it (exact:
      its presence does not depend on the draws, and a repeated draw meets a residual of 0);
    - ``softmax``: n-gram children verified with the draft's q, like drawn ones (biased);
    - ``merged``: n-gram children taken into the set of draws without replacement, first (biased);
    - ``ngram-first-grafted``: n-gram children first, but grafted only where no draw has the token:
      their presence depends on children tested after them (biased).
    """
    p = p_model(prefix)
    if level == len(shape):
        return {(x,): float(p[x]) for x in range(V) if p[x] > 0}
    k, m = (0, 1) if under_ngram else shape[level]
    q = q_model(prefix)
    rule = ChildRule.IID if how == "iid" else ChildRule.WITHOUT_REPLACEMENT
    out = defaultdict(float)
    for kids, prob in children_outcomes(q, k, how):
        if prob == 0:
            continue
        kids = list(kids)
        fixed = ngram_tokens(prefix, m)
        grafted = [x for x in fixed if x not in kids]
        if variant == "exact":
            tokens, flags = kids + grafted, [False] * len(kids) + [True] * len(grafted)
        elif variant == "ngram-first-kept":
            tokens, flags = fixed + kids, [True] * len(fixed) + [False] * len(kids)
        elif variant == "softmax":
            tokens, flags = kids + grafted, [False] * (len(kids) + len(grafted))
        elif variant == "merged":
            tokens, flags, rule = grafted + kids, [False] * (len(kids) + len(grafted)), ChildRule.WITHOUT_REPLACEMENT
        else:
            assert variant == "ngram-first-grafted"
            tokens, flags = grafted + kids, [True] * len(grafted) + [False] * len(kids)
        ngram_nodes = set(range(len(tokens))) - {j for j, x in enumerate(tokens) if x in kids and not flags[j]}
        oc = node_outcomes(p, tokens, rule, q, flags)
        for j, x in enumerate(tokens):
            a = float(oc.accept_probs[j])
            if a > 0:
                below = mixed_emitted(p_model, q_model, prefix + (x,), level + 1, shape, how, variant,
                                      under_ngram or j in ngram_nodes)
                for seq, ps in below.items():
                    out[(x,) + seq] += prob * a * ps
        rej = float(oc.reject_prob)
        for y in range(V):
            if oc.residual[y] > 0:
                out[(y,)] += prob * rej * float(oc.residual[y])
    return out


def mixed_error(shape, how, variant, params, seeds=range(4)) -> float:
    worst = 0.0
    for s in seeds:
        p_model, q_model = Model(100 + s, params), Model(200 + s, params, sharp=1.0)
        got = first_tokens(mixed_emitted(p_model, q_model, (), 0, shape, how, variant), p_model)
        assert abs(sum(got.values()) - 1.0) < 1e-9
        want = target_joint(p_model)
        worst = max(worst, max(abs(got.get(k, 0.0) - v) for k, v in want.items()))
    return worst


MIXED_SHAPES = [
    ("iid", [(1, 1), (1, 1)]),  # a hybrid chain: one draw per node, the n-gram continuation beside it
    ("wor", [(2, 1), (1, 1)]),  # a hybrid tree
    ("wor", [(2, 2)]),  # two n-gram branches beside two draws
    ("iid", [(0, 2), (1, 1)]),  # the root drafted by n-gram alone, then by both
]


@pytest.mark.unit
@pytest.mark.parametrize("params", WARPS, ids=lambda p: f"t{p.temperature}-k{p.top_k}-p{p.top_p}")
@pytest.mark.parametrize("how,shape", MIXED_SHAPES, ids=lambda x: str(x))
@pytest.mark.parametrize("variant", ["exact", "ngram-first-kept"])
def test_mixed_rule_reproduces_the_target_exactly(how, shape, variant, params):
    assert mixed_error(shape, how, variant, params) < EXACT


@pytest.mark.unit
@pytest.mark.parametrize("variant", ["softmax", "merged", "ngram-first-grafted"])
@pytest.mark.parametrize("how,shape", MIXED_SHAPES[:3], ids=lambda x: str(x))
def test_negative_controls_mixed_children_verified_wrongly_are_biased(variant, how, shape):
    assert mixed_error(shape, how, variant, WARPS[0]) > 1e-3
