"""Draft-length policies: the cost model's decisions, and losslessness under every policy."""

import random

import pytest

from hedgerow.drafting.policy import AcceptanceStats, CostPolicy, HeuristicPolicy, LinearCost, make_policy
from hedgerow.server.engine.sequence import SpecMode, SpecParams
from tests.tiny import hf_greedy, make_engine, request, tiny_model

PROMPTS = [[5, 6, 7, 8, 9], [10, 11], [3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13], [40]]


class Seq:
    def __init__(self, rid="r"):
        self.request_id = rid
        self.policy_state = {}


def cost_policy(alpha: float, verify=(0.010, 0.0002), draft=(0.002, 0.00005)) -> CostPolicy:
    p = CostPolicy()
    p.verify.a, p.verify.b = verify
    p.draft.a, p.draft.b = draft
    p.catch_up.a, p.catch_up.b = draft
    p.global_stats.hits = [alpha] * p.max_gamma
    return p


def test_linear_cost_fit_recovers_a_line_and_online_moves_the_intercept():
    c = LinearCost()
    c.fit([(n, 0.003 + 0.0005 * n) for n in (1, 4, 16, 32)])
    assert c(0) == pytest.approx(0.003, rel=1e-6) and c(10) == pytest.approx(0.008, rel=1e-6)
    for _ in range(100):  # the machine got slower by 2 ms per pass, observed at n = 1 and 2 only
        c.observe(1, 0.005 + 0.0005)
        c.observe(2, 0.005 + 0.001)
    assert c.b == pytest.approx(0.0005) and c(0) == pytest.approx(0.005, rel=1e-3)


def test_acceptance_stats_expected_tokens():
    s = AcceptanceStats(4, prior=0.5)
    assert s.expected_tokens(0) == 1.0
    assert s.expected_tokens(2) == pytest.approx(1 + 0.5 + 0.25)
    for _ in range(200):
        s.observe(drafted=4, accepted=1)  # position 1 always accepted, position 2 always rejected
    assert s.hits[0] > 0.99 and s.hits[1] < 0.01


def test_cost_policy_speculates_with_a_good_cheap_draft():
    p = cost_policy(alpha=0.8)
    assert p.plan([Seq()], [8], [8])[0] >= 3


def test_cost_policy_falls_to_plain_decoding_with_a_useless_draft():
    p = cost_policy(alpha=0.02)
    assert p.plan([Seq()], [8], [8]) == [0]


def test_cost_policy_falls_to_plain_decoding_when_verify_is_expensive():
    # a verify pass whose cost grows steeply with its tokens (compute-bound): extra tokens never pay
    p = cost_policy(alpha=0.6, verify=(0.010, 0.010))
    assert p.plan([Seq()], [8], [8]) == [0]


def test_cost_policy_drafts_less_as_the_batch_grows():
    p = cost_policy(alpha=0.7, verify=(0.010, 0.0008))
    g1 = p.plan([Seq()], [8], [8])[0]
    g32 = p.plan([Seq(str(i)) for i in range(32)], [8] * 32, [8] * 32)
    assert max(g32) < g1


def test_cost_policy_respects_limits_and_probes_rarely():
    p = cost_policy(alpha=0.02)
    p.probe_every = 4
    plans = [p.plan([Seq()], [8], [8])[0] for _ in range(8)]
    assert plans.count(1) == 2 and plans.count(0) == 6
    assert cost_policy(alpha=0.9).plan([Seq()], [8], [2]) == [2]


def test_keep_alive_probes_draft_one_sequence_at_a_time_in_turn():
    p = cost_policy(alpha=0.02)  # nobody should draft
    p.probe_every = 4
    seqs = [Seq(str(i)) for i in range(3)]
    probed = []
    for _ in range(12):
        g = p.plan(seqs, [8] * 3, [8] * 3)
        assert sum(g) <= 1
        if sum(g):
            probed.append(g.index(1))
    assert probed == [0, 1, 2]


def test_heuristic_policy_grows_and_shrinks():
    p, s = HeuristicPolicy(), Seq()
    assert p.plan([s], [4], [16]) == [4]
    p.observe(s, 4, 4)
    assert p.plan([s], [4], [16]) == [6]
    p.observe(s, 6, 2)
    assert p.plan([s], [4], [16]) == [5]


def test_unknown_policy_is_refused():
    with pytest.raises(ValueError, match="adaptive"):
        make_policy("fastest")


@pytest.fixture(scope="module")
def pair():
    return tiny_model("llama", seed=0), tiny_model("llama", seed=1, layers=1, hidden=32)


@pytest.mark.parametrize("policy", ["heuristic", "confidence", "cost"])
@pytest.mark.parametrize("mode", [SpecMode.CHAIN, SpecMode.TREE])
def test_every_policy_keeps_greedy_output_equal_to_the_target(pair, policy, mode):
    target, draft = pair
    refs = [hf_greedy(target, p, 30) for p in PROMPTS]
    spec = SpecParams(mode=mode, draft_tokens=4, tree_budget=8, tree_depth=4, tree_topk=2)
    engine = make_engine(target, draft, adaptive=policy)
    out = engine.generate(request(str(i), p, 30, spec=spec) for i, p in enumerate(PROMPTS))
    assert [out[str(i)].generated for i in range(len(PROMPTS))] == refs
    solo = make_engine(target, draft, adaptive=policy, slots=1)
    assert solo.generate([request("r", PROMPTS[2], 30, spec=spec)])["r"].generated == refs[2]


def test_cost_policy_stops_speculating_with_a_random_draft(pair):
    target, draft = pair  # an unrelated random draft: almost nothing is accepted
    engine = make_engine(target, draft, adaptive="cost")
    seq = engine.generate([request("r", PROMPTS[0], 120, ignore_eos=True)])["r"]
    assert seq.stats.draft_tokens < 0.25 * seq.stats.verify_steps, seq.stats


def test_cost_policy_finds_a_long_draft_past_a_losing_short_one():
    # a high fixed cost per speculative step and cheap extra tokens: gamma 1 loses to plain
    # decoding, gamma 8 wins; a one-token-at-a-time ascent would stop at 0
    p = cost_policy(alpha=0.9, verify=(0.010, 0.0001), draft=(0.008, 0.0))
    p.draft = LinearCost(a=0.0005, b=0.0)
    p.step_time = lambda gs: 0.010 + (0.012 if any(gs) else 0.0) + 0.0005 * max(gs, default=0)
    assert p.plan([Seq()], [8], [8]) == [8]


def test_cost_policy_for_trees_keeps_the_faster_arm_and_probes_the_other():
    p = cost_policy(alpha=0.5)
    p.probe_every = 10
    s = Seq()
    assert p.plan_trees([s], [16], [16]) == [16]  # unmeasured: try trees first
    p.observe_rate(True, 3, 0.020)  # 150 tokens/s with trees
    assert p.plan_trees([s], [16], [16]) == [0]  # then the other arm, until it is measured
    p.observe_rate(False, 1, 0.050)  # the switch step (catch-up etc.) is not a sample of plain decoding
    assert p.plan_trees([s], [16], [16]) == [0]
    p.observe_rate(False, 1, 0.005)  # 200 tokens/s without
    plans = []
    for _ in range(200):
        plans.append(p.plan_trees([s], [16], [16])[0])
        p.observe_rate(plans[-1] > 0, 3 if plans[-1] else 1, 0.020 if plans[-1] else 0.005)
    assert plans.count(0) >= 185 and plans[:5] == [0] * 5
    runs = "".join("T" if x else "." for x in plans).split(".")
    assert {len(r) for r in runs if r} == {3}  # probes of 3 steps, backing off while trees keep losing
    assert 2 <= sum(1 for r in runs if r) <= 5


def test_cost_policy_for_trees_does_not_charge_the_switch_to_the_tree():
    # steady tree steps make 200 tokens/s against 150 for plain ones, but the step after every
    # switch costs 10x: counted as a tree sample it would make every probe look like a loss
    p = cost_policy(alpha=0.5)
    p.probe_every = 8
    s, plans, last = Seq(), [], None
    for _ in range(120):
        on = p.plan_trees([s], [16], [16])[0] > 0
        cost = (0.015 if on else 0.0067) * (10 if last is not None and on != last else 1)
        p.observe_rate(on, 3 if on else 1, cost)
        plans.append(on)
        last = on
    assert sum(plans[20:]) >= 0.9 * len(plans[20:])


def test_rarely_drafted_positions_borrow_from_the_position_before():
    s = AcceptanceStats(8, prior=0.6)
    for _ in range(50):
        s.observe(drafted=1, accepted=1)  # only position 1 ever drafted: always accepted
    rates = s.rates()
    assert rates[0] > 0.99 and all(r > 0.99 for r in rates[1:])  # not the 0.6 prior
    for _ in range(50):
        s.observe(drafted=3, accepted=1)  # position 2 now observed: always rejected
    rates = s.rates()
    assert rates[1] < 0.01 and rates[2] < 0.01  # position 3 borrows from position 2


def test_a_sequence_that_stopped_drafting_comes_back_when_the_pair_accepts_well():
    p = cost_policy(alpha=0.85)
    p.global_stats.weight = [1.0] * p.max_gamma
    s = Seq()
    for _ in range(20):
        p._stats(s).observe(drafted=4, accepted=0)  # a stretch where nothing is accepted
    rng, plans = random.Random(0), []
    for _ in range(40):
        g = p.plan([s], [8], [8])[0]
        accepted = next((i for i in range(g) if rng.random() > 0.85), g)  # the draft is good again
        p.observe(s, g, accepted)
        plans.append(g)
    assert plans[0] == 0 and max(plans[-10:]) >= 4  # relaxes toward the pair's acceptance and drafts again


def run_chains(p, seqs, steps, cost_on, cost_off):
    """Plan and observe ``steps`` steps on a machine whose steps take ``cost_*`` x the prediction;
    returns each step's gammas."""
    plans = []
    for _ in range(steps):
        p.start_step()
        gammas = p.plan(seqs, [4] * len(seqs), [4] * len(seqs))
        on = any(gammas)
        p.observe_rate(on, len(seqs), p.step_time(gammas) * (cost_on if on else cost_off))
        plans.append(gammas)
    return plans


def test_cost_policy_for_chains_falls_to_plain_decoding_where_measured_steps_say_so():
    # the model is sure gamma 4 pays (cheap draft, high acceptance) but at 16 sequences the
    # machine's drafting steps take 3x what it predicts (plain ones what it predicts)
    p = cost_policy(alpha=0.8)
    seqs = [Seq(str(i)) for i in range(16)]
    plans = [sum(g) for g in run_chains(p, seqs, 1000, 3.0, 1.0)]
    assert plans[0] > 1
    # after learning, only keep-alive probes (one sequence, one token): going back to drafting
    # with the whole batch would cost every sequence's catch-up
    assert max(plans[100:]) == 1 and plans[100:].count(1) <= 900 // p.probe_every + 1
    # a batch of one is another bucket, measured on its own: there the model's plan still runs
    assert p.plan([Seq("single")], [4], [4])[0] >= 3


def test_cost_policy_for_chains_keeps_speculating_where_it_pays_and_measures_plain_steps_rarely():
    # drafting steps take 1.2x the prediction: speculation still pays at batch 1 with alpha 0.8
    p = cost_policy(alpha=0.8)
    plans = [any(g) for g in run_chains(p, [Seq()], 400, 1.2, 1.0)]
    assert 400 // p.plain_every - 1 <= plans.count(False) <= 400 // p.plain_every + 3  # gaps 8, 16, 32, 64, 64 ...
    assert p.scale[0][True] == pytest.approx(1.2, rel=0.01) and p.scale[0][False] == pytest.approx(1.0, rel=0.01)


def test_batch_buckets_keep_a_serving_batch_in_one_bucket():
    from hedgerow.drafting.policy import batch_bucket

    assert len({batch_bucket(n) for n in range(12, 23)}) == 1  # 16 clients: 14-16 running
    assert len({batch_bucket(n) for n in (3, 4, 5)}) == 1
    assert batch_bucket(1) != batch_bucket(2) != batch_bucket(4) != batch_bucket(16)
