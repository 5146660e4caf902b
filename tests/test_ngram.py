"""N-gram lookup, grafting and their pricing, as pure functions: the index against a brute-force
search, the pool's bound, the grafted tree's structure and the rule its walk applies, and the
cost policy's choice between model drafts, n-gram drafts, both and none on simulated steps."""

import random

import pytest
import torch

from hedgerow.drafting.cost_policy import CostPolicy
from hedgerow.drafting.costs import CostModel, LinearCost
from hedgerow.drafting.ngram import NgramIndex, NgramPool, follow, graft
from hedgerow.drafting.ngram_plan import NgramOptions
from hedgerow.drafting.plan import Room, StepReport, StepSeconds, ngram_sizes
from hedgerow.drafting.spec import ProposerKind, SpecMode, SpecParams
from hedgerow.verify.accept import sampling_walk
from hedgerow.verify.tree import ChildRule, DraftTree


def brute_force(tokens, lo, hi, depth, branches):
    """The definition: for n from hi down to lo, every earlier occurrence of the last n tokens,
    most recent first, gives the tokens that followed it; distinct ones, up to ``branches``."""
    out = []
    for n in range(min(hi, len(tokens)), lo - 1, -1):
        suffix = tokens[len(tokens) - n :]
        starts = [e for e in range(n, len(tokens)) if tokens[e - n : e] == suffix]
        for e in reversed(starts[-8:]):
            c = follow(tokens, e, depth)
            if c not in out:
                out.append(c)
                if len(out) == branches:
                    return out
    return out


@pytest.mark.unit
def test_index_grown_token_by_token_finds_what_a_brute_force_search_finds():
    rng = random.Random(0)
    for trial in range(30):
        tokens = [rng.randrange(4 if trial % 2 else 12) for _ in range(rng.randrange(1, 80))]
        index = NgramIndex(2, 4)
        for k in range(1, len(tokens) + 1):  # committed a few tokens at a time, as steps do
            if k % 3 == 0 or k == len(tokens):
                index.update(tokens[:k])
                for branches in (1, 3):
                    assert index.find(tokens[:k], 5, branches) == brute_force(tokens[:k], 2, 4, 5, branches)


@pytest.mark.unit
def test_lookup_prefers_the_longest_suffix_then_the_most_recent_occurrence():
    tokens = [1, 2, 3, 9, 5, 2, 3, 8, 4, 1, 2, 3]
    index = NgramIndex(2, 4)
    index.update(tokens)
    # (1, 2, 3) occurred once, followed by 9; (2, 3) also before 8, more recently
    assert index.find(tokens, 2, 3) == [(9, 5), (8, 4)]
    assert follow([7, 1, 2, 1, 2], 3, 5) == (1, 2, 1, 2, 1)  # a periodic text continues its period
    assert NgramIndex(2, 4).find([5, 6], 3, 1) == []  # the suffix is never its own match


@pytest.mark.unit
def test_pool_keeps_the_most_recent_entries_within_its_size():
    pool = NgramPool(size=6, span=3)
    pool.add([1, 2, 3, 4, 5, 6], start=3, lo=2, hi=2)  # followers 4, 5, 6: grams (2, 3), (3, 4), (4, 5)
    assert pool.find([9, 2, 3], 2, 2, 5) == (4, 5, 6)
    pool.add([7, 8, 9, 10, 11, 12, 13], start=1, lo=2, hi=3)
    assert len(pool.entries) == 6 and pool.find([0, 2, 3], 2, 2, 5) is None  # the oldest were dropped
    assert pool.find([0, 9, 10], 2, 3, 2) == (11, 12)


@pytest.mark.unit
def test_graft_merges_continuations_as_a_trie_after_the_models_nodes():
    q = torch.full((4, 10), 0.1)
    chain = DraftTree.chain([0, 5, 6, 7], ChildRule.IID, q)  # the model's chain: 5, 6, 7
    tree = graft(chain, [(5, 6, 2, 3), (5, 4), (5, 6, 2, 9)], budget=10)
    # (5, 6) is the model's; 2, 3 leave it under 6; 4 leaves under 5; 9 under the grafted 2
    assert tree.tokens.tolist() == [0, 5, 6, 7, 2, 3, 4, 9]
    assert tree.parents.tolist() == [-1, 0, 1, 2, 2, 4, 1, 4]
    assert tree.point_mass_from == 4 and tree.ruled == 4 and tree.rule is ChildRule.IID
    assert tree.point_masses(2) == [False, True] and tree.point_masses(4) == [True, True]
    assert tree.draft_probs.shape == (8, 10) and tree.draft_probs[4:].abs().sum() == 0
    assert graft(chain, [(5, 6, 7)], budget=10) is chain  # nothing new: the model's own chain
    cut = graft(chain, [(5, 6, 2, 3), (4,)], budget=1)
    assert cut.tokens.tolist() == [0, 5, 6, 7, 2]


@pytest.mark.unit
def test_the_walk_verifies_grafted_nodes_as_point_masses():
    """Root children: the model's draw 1 (q all on 1) and the n-gram's 2. p = (0, 0, .5, .5, 0):
    1 is rejected and leaves r = p; 2, a point mass, is accepted with r(2) = 0.5. Verified with q
    instead, q(2) = 0 would accept it every time."""
    q = torch.tensor([[0.0, 1.0, 0.0, 0.0, 0.0]] * 2)
    tree = graft(DraftTree.chain([0, 1], ChildRule.IID, q), [(2,)], budget=1)
    p = torch.tensor([[0.0, 0.0, 0.5, 0.5, 0.0]] * 3)
    g = torch.Generator().manual_seed(0)
    hits = sum(sampling_walk(tree, p, g).path[1:] == [2] for _ in range(2000))
    assert 900 < hits < 1100


@pytest.mark.unit
def test_proposer_resolves_to_the_engines_default_and_sizes_follow_it():
    spec = SpecParams(mode=SpecMode.CHAIN, draft_tokens=4)
    assert spec.resolve(True).proposer is ProposerKind.HYBRID and spec.resolve(False).proposer is ProposerKind.NGRAM
    assert SpecParams(proposer="ngram").proposer is ProposerKind.NGRAM
    room = Room(depth=8, rows=64, ngram=((1, 2, 3),))
    ngram, hybrid, model = (SpecParams(draft_tokens=4, proposer=p) for p in ("ngram", "hybrid", "model"))
    assert (room.cap(ngram), room.ngram_cap(ngram)) == (0, 3)
    assert (room.cap(hybrid), room.ngram_cap(hybrid)) == (4, 3)
    assert (room.cap(model), room.ngram_cap(model)) == (4, 3)  # offered; the proposer never looks up for it
    tree = SpecParams(mode=SpecMode.TREE, tree_budget=5, proposer="ngram")
    assert ngram_sizes([type("S", (), {"spec": tree})()], [Room(8, 64, ((1, 2, 3), (4, 5, 6)))]) == [5]


@pytest.mark.unit
def test_ngram_options_add_only_what_beats_the_steps_rate():
    # the model's chain of 2 reaches depth 1 w.p. 0.5, depth 2 w.p. 0.25; the n-gram's reach 0.9, 0.8, 0.1
    expected, reach = [[1.0, 1.5, 1.75]], [[0.9, 0.8, 0.1]]
    tokens, seconds, lengths = NgramOptions(reach).add(expected, [2], 1.75, 0.010, 0.001)
    assert lengths == [2]  # the third token adds 0.1 tokens for 1 ms: below 1.75 + ... tokens per 12 ms
    assert tokens == pytest.approx(1.75 + 0.9 * 0.5 + 0.8 * 0.75) and seconds == pytest.approx(0.012)
    assert NgramOptions(reach).add(expected, [2], 1.75, 0.010, 1.0)[2] == [0]  # verify tokens too dear


class Seq:
    def __init__(self, proposer):
        self.spec = SpecParams(mode=SpecMode.CHAIN, draft_tokens=8, proposer=proposer)


def run(policy, seqs, steps, model_alpha, ngram_alpha, offered=6):
    """Plan and observe steps on a machine the cost model describes exactly; each step the draft
    model's tokens are accepted with ``model_alpha`` each, the n-gram's with ``ngram_alpha``."""
    rng, plans = random.Random(0), []
    room = Room(depth=8, rows=64, ngram=(tuple(range(offered)),))
    for _ in range(steps):
        plan = policy.plan(seqs, [room] * len(seqs))
        model = [next((i for i in range(g) if rng.random() > model_alpha), g) for g in plan.sizes]
        ngram = [(h, next((i for i in range(h) if rng.random() > ngram_alpha), h)) for h in plan.ngram]
        seconds = policy.costs.step_time(plan.sizes) + policy.costs.verify.b * sum(plan.ngram)
        policy.observe(StepReport(plan, seqs, list(plan.sizes), model, emitted=len(seqs), verify_tokens=1,
                                  draft_passes=[], seconds=StepSeconds(0.0, seconds, 0.0), ngram=ngram))
        plans.append((list(plan.sizes), list(plan.ngram)))
    return plans


def costs(verify_slope=0.0005, draft=0.003):
    class Fixed(CostModel):
        def observe(self, *args):
            pass

    return Fixed(LinearCost(0.010, verify_slope), LinearCost(draft, 0.0001), LinearCost(draft, 0.0001))


@pytest.mark.unit
@pytest.mark.parametrize(
    "model_alpha,ngram_alpha,draft,verify_slope,offered,want",
    [
        (0.8, 0.05, 0.003, 0.0005, 6, "model"),  # lookup keeps missing: the draft model alone
        (0.05, 0.9, 0.003, 0.0005, 6, "ngram"),  # a useless draft and text that copies: no draft pass, n-gram only
        (0.7, 0.7, 0.003, 0.0005, 6, "ngram"),  # as good as the draft and free of its passes: n-gram only
        # a cheap good draft and almost free verify tokens (a GPU): a short sure continuation beside it
        (0.8, 0.95, 0.0005, 0.00005, 2, "both"),
        (0.05, 0.05, 0.003, 0.0005, 6, "none"),  # plain decoding
    ],
)
def test_cost_policy_chooses_model_ngram_both_or_none(model_alpha, ngram_alpha, draft, verify_slope, offered, want):
    policy = CostPolicy(costs(verify_slope, draft), acceptance_prior=0.6)
    plans = run(policy, [Seq("hybrid")], 300, model_alpha, ngram_alpha, offered)[100:]
    model = sum(1 for sizes, _ in plans if sizes[0]) / len(plans)
    ngram = sum(1 for _, lengths in plans if lengths[0]) / len(plans)
    got = {(True, False): "model", (False, True): "ngram", (True, True): "both", (False, False): "none"}
    assert got[(model > 0.7, ngram > 0.7)] == want, (model, ngram)


@pytest.mark.unit
def test_cost_policy_takes_no_ngram_nodes_when_verify_tokens_are_dear():
    policy = CostPolicy(costs(verify_slope=0.02), acceptance_prior=0.6)
    plans = run(policy, [Seq("ngram")], 100, 0.0, 0.5)
    assert all(sizes == [0] for sizes, _ in plans) and sum(lengths[0] for _, lengths in plans[20:]) == 0
