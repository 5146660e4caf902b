"""Draft-size policies through their public interface: ``plan`` and ``observe`` on simulated steps
(an injected cost model, step seconds the test decides), and losslessness under every policy, on
engines whose time passes only in model passes (tiny.PassClock), so the cost policy decides the
same on any machine."""

import random

import pytest

from hedgerow.drafting.acceptance import AcceptanceStats
from hedgerow.drafting.cost_policy import CostPolicy
from hedgerow.drafting.costs import OUTLIER, CostModel, LinearCost, batch_bucket
from hedgerow.drafting.plan import Room, StepPlan, StepReport, StepSeconds
from hedgerow.drafting.policy import HeuristicPolicy, make_policy
from hedgerow.drafting.spec import SpecMode, SpecParams
from tests.tiny import PROMPTS, PassClock, hf_greedy, make_engine, request, tiny_model

ROOM = Room(depth=8, rows=64)


class Seq:
    """What a policy sees of a sequence: its speculation settings (and its identity)."""

    def __init__(self, mode=SpecMode.CHAIN, draft_tokens=8, tree_budget=16):
        self.spec = SpecParams(mode=mode, draft_tokens=draft_tokens, tree_budget=tree_budget)


class FixedCosts(CostModel):
    """A cost model that measurements do not move: only the policy's clock scales learn."""

    def observe(self, *args) -> None:
        pass


def costs(verify=(0.010, 0.0002), draft=(0.002, 0.00005), fixed=True) -> CostModel:
    cls = FixedCosts if fixed else CostModel
    return cls(LinearCost(*verify), LinearCost(*draft), LinearCost(*draft))


def cost_policy(alpha: float, verify=(0.010, 0.0002), draft=(0.002, 0.00005), **kw) -> CostPolicy:
    return CostPolicy(costs(verify, draft), acceptance_prior=alpha, **kw)


def plan(p, seqs, room=ROOM):
    return p.plan(seqs, [room] * len(seqs))


def observe(p, step_plan, seqs, *, accepted=None, emitted=None, seconds=0.01, draft_seconds=0.0):
    """Report a step that drafted what ``step_plan`` asked and took ``seconds``."""
    drafted = list(step_plan.sizes)
    p.observe(StepReport(
        step_plan, seqs, drafted, accepted if accepted is not None else drafted,
        emitted=emitted if emitted is not None else len(seqs), verify_tokens=sum(d + 1 for d in drafted),
        draft_passes=[], seconds=StepSeconds(draft_seconds, seconds, 0.0),
    ))


@pytest.mark.unit
def test_linear_cost_fit_recovers_a_line_and_online_moves_the_intercept():
    c = LinearCost()
    c.fit([(n, 0.003 + 0.0005 * n) for n in (1, 4, 16, 32)])
    assert c(0) == pytest.approx(0.003, rel=1e-6) and c(10) == pytest.approx(0.008, rel=1e-6)
    for _ in range(100):  # the machine got slower by 2 ms per pass, observed at n = 1 and 2 only
        c.observe(1, 0.005 + 0.0005)
        c.observe(2, 0.005 + 0.001)
    assert c.b == pytest.approx(0.0005) and c(0) == pytest.approx(0.005, rel=1e-3)


@pytest.mark.unit
def test_calibration_fits_the_measured_passes():
    p = CostPolicy()
    p.calibrate(lambda model, n: (0.010 + 0.001 * n) if model == "target" else (0.002 + 0.0001 * n))
    assert p.costs.verify(10) == pytest.approx(0.020) and p.costs.draft(10) == pytest.approx(0.003)


@pytest.mark.unit
def test_one_slow_step_moves_the_costs_a_bounded_way():
    # a step that recompiled a graph took ~1 s where 3 ms were predicted: counted whole, it made the
    # draft phase look ~50x dearer and the policy stopped drafting for a hundred steps
    line = LinearCost(a=0.002, b=0.001)
    line.observe(1, 1.0)
    assert line(1) <= 0.9 * 0.003 + 0.1 * OUTLIER * 0.003 + 1e-12
    for _ in range(30):  # a real, lasting change of cost is still learned
        line.observe(1, 0.030)
    assert line(1) == pytest.approx(0.030, rel=0.05)


@pytest.mark.unit
def test_acceptance_stats_expected_tokens():
    s = AcceptanceStats(4, prior=0.5)
    assert s.expected_prefix(2) == pytest.approx([1.0, 1.5, 1.75])
    for _ in range(200):
        s.observe(drafted=4, accepted=1)  # position 1 always accepted, position 2 always rejected
    assert s.hits[0] > 0.99 and s.hits[1] < 0.01


@pytest.mark.unit
def test_cost_policy_speculates_with_a_good_cheap_draft():
    assert plan(cost_policy(alpha=0.8), [Seq()]).sizes[0] >= 3


@pytest.mark.unit
def test_cost_policy_falls_to_plain_decoding_with_a_useless_draft():
    assert plan(cost_policy(alpha=0.02), [Seq()]).sizes == [0]


@pytest.mark.unit
def test_cost_policy_falls_to_plain_decoding_when_verify_is_expensive():
    # a verify pass whose cost grows steeply with its tokens (compute-bound): extra tokens never pay
    assert plan(cost_policy(alpha=0.6, verify=(0.010, 0.010)), [Seq()]).sizes == [0]


@pytest.mark.unit
def test_cost_policy_drafts_less_as_the_batch_grows():
    p = cost_policy(alpha=0.7, verify=(0.010, 0.0008))
    g1 = plan(p, [Seq()]).sizes[0]
    g32 = plan(p, [Seq() for _ in range(32)]).sizes
    assert max(g32) < g1


@pytest.mark.unit
def test_cost_policy_respects_limits_and_probes_rarely():
    p = cost_policy(alpha=0.02, probe_every=4)
    s = Seq()
    plans = [plan(p, [s]).sizes[0] for _ in range(8)]
    assert plans.count(1) == 2 and plans.count(0) == 6
    assert plan(cost_policy(alpha=0.9), [Seq()], Room(depth=2, rows=64)).sizes == [2]


@pytest.mark.unit
def test_keep_alive_probes_draft_one_sequence_at_a_time_in_turn():
    p = cost_policy(alpha=0.02, probe_every=4)  # nobody should draft
    seqs = [Seq() for _ in range(3)]
    probed = []
    for _ in range(12):
        g = plan(p, seqs).sizes
        assert sum(g) <= 1
        if sum(g):
            probed.append(g.index(1))
    assert probed == [0, 1, 2]


@pytest.mark.unit
def test_heuristic_policy_grows_and_shrinks():
    p, s = HeuristicPolicy(), Seq(draft_tokens=4)
    room = Room(depth=16, rows=64)
    first = p.plan([s], [room])
    assert first.sizes == [4]
    observe(p, first, [s], accepted=[4])
    second = p.plan([s], [room])
    assert second.sizes == [6]
    observe(p, second, [s], accepted=[2])
    assert p.plan([s], [room]).sizes == [5]


@pytest.mark.unit
def test_unknown_policy_is_refused():
    with pytest.raises(ValueError, match="adaptive"):
        make_policy("fastest")


@pytest.fixture(scope="module")
def pair():
    return tiny_model("llama", seed=0), tiny_model("llama", seed=1, layers=1, hidden=32)


@pytest.mark.engine
@pytest.mark.parametrize("policy", ["heuristic", "confidence", "cost"])
@pytest.mark.parametrize("mode", [SpecMode.CHAIN, SpecMode.TREE])
def test_every_policy_keeps_greedy_output_equal_to_the_target(pair, policy, mode):
    target, draft = pair
    refs = [hf_greedy(target, p, 30) for p in PROMPTS]
    spec = SpecParams(mode=mode, draft_tokens=4, tree_budget=8, tree_depth=4, tree_topk=2)
    engine = make_engine(target, draft, adaptive=policy, clock=PassClock())
    out = engine.generate(request(str(i), p, 30, spec=spec) for i, p in enumerate(PROMPTS))
    assert [out[str(i)].generated for i in range(len(PROMPTS))] == refs
    solo = make_engine(target, draft, adaptive=policy, slots=1, clock=PassClock())
    assert solo.generate([request("r", PROMPTS[2], 30, spec=spec)])["r"].generated == refs[2]


@pytest.mark.engine
def test_cost_policy_stops_speculating_with_a_random_draft(pair):
    target, draft = pair  # an unrelated random draft: almost nothing is accepted
    # on PassClock's lines drafting pays at the policy's prior acceptance: it starts, then must stop
    engine = make_engine(target, draft, adaptive="cost", clock=PassClock())
    seq = engine.generate([request("r", PROMPTS[0], 120, ignore_eos=True)])["r"]
    assert seq.stats.draft_tokens < 0.25 * seq.stats.verify_steps, seq.stats


@pytest.mark.unit
def test_cost_policy_finds_a_long_draft_past_a_losing_short_one():
    # a high fixed cost per speculative step and cheap extra tokens: 1 draft token loses to plain
    # decoding, 8 win; a one-token-at-a-time ascent would stop at 0
    class StepCosts(FixedCosts):
        def step_time(self, sizes):
            return 0.010 + (0.012 if any(sizes) else 0.0) + 0.0005 * max(sizes, default=0)

    p = CostPolicy(StepCosts(), acceptance_prior=0.9)
    assert plan(p, [Seq()]).sizes == [8]


def tree_step(p, s, emitted_seconds):
    """Plan one tree step and report it with the (tokens, seconds) the machine gives for its arm."""
    step = plan(p, [s])
    on = step.sizes[0] > 0
    tokens, seconds = emitted_seconds(on)
    observe(p, step, [s], accepted=[tokens - 1 if on else 0], emitted=tokens, seconds=seconds)
    return on


@pytest.mark.unit
def test_cost_policy_for_trees_keeps_the_faster_arm_and_probes_the_other():
    p = cost_policy(alpha=0.5, probe_every=10)
    s = Seq(SpecMode.TREE)
    assert tree_step(p, s, lambda on: (3, 0.020))  # unmeasured: try trees first; 150 tokens/s
    assert not tree_step(p, s, lambda on: (1, 0.050))  # the switch step is no sample of plain decoding
    assert not tree_step(p, s, lambda on: (1, 0.005))  # then the other arm, until measured: 200 tokens/s
    plans = [tree_step(p, s, lambda on: (3, 0.020) if on else (1, 0.005)) for _ in range(200)]
    assert plans.count(False) >= 185 and plans[:5] == [False] * 5
    runs = "".join("T" if x else "." for x in plans).split(".")
    assert {len(r) for r in runs if r} == {3}  # probes of 3 steps, backing off while trees keep losing
    assert 2 <= sum(1 for r in runs if r) <= 5


@pytest.mark.unit
def test_cost_policy_for_trees_does_not_charge_the_switch_to_the_tree():
    # steady tree steps make 200 tokens/s against 150 for plain ones, but the step after every
    # switch costs 10x: counted as a tree sample it would make every probe look like a loss
    p = cost_policy(alpha=0.5, probe_every=8)
    s, plans, last = Seq(SpecMode.TREE), [], None
    for _ in range(120):
        step = plan(p, [s])
        on = step.sizes[0] > 0
        cost = (0.015 if on else 0.0067) * (10 if last is not None and on != last else 1)
        observe(p, step, [s], accepted=[2 if on else 0], emitted=3 if on else 1, seconds=cost)
        plans.append(on)
        last = on
    assert sum(plans[20:]) >= 0.9 * len(plans[20:])


@pytest.mark.unit
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


def simulated_acceptance(rng, sizes, alpha):
    """Accepted draft tokens of each chain when every position is accepted with probability alpha."""
    return [next((i for i in range(g) if rng.random() > alpha), g) for g in sizes]


@pytest.mark.unit
def test_a_sequence_that_stopped_drafting_comes_back_when_the_pair_accepts_well():
    p = cost_policy(alpha=0.85)
    rng = random.Random(0)
    s, others = Seq(), [Seq() for _ in range(8)]
    for n in range(320):  # the pair is well measured at 0.85; the last 20 steps nothing of s is accepted
        seqs = others + [s] if n >= 300 else others
        drafted = [4] * len(seqs)
        accepted = simulated_acceptance(rng, [4] * len(others), 0.85) + [0] * (len(seqs) - len(others))
        observe(p, StepPlan(drafted), seqs, accepted=accepted)  # steps the policy did not plan: acceptance only
    plans = []
    for _ in range(40):  # s alone now, and its draft is good again
        step = plan(p, [s])
        observe(p, step, [s], accepted=simulated_acceptance(rng, step.sizes, 0.85))
        plans.append(step.sizes[0])
    assert plans[0] == 0 and max(plans[-10:]) >= 4  # relaxes toward the pair's acceptance and drafts again


def run_chains(p, seqs, steps, cost_on, cost_off, alpha=0.8):
    """Plan and observe ``steps`` steps on a machine whose steps take ``cost_*`` x the prediction
    and whose draft tokens are accepted with probability ``alpha``; returns each step's sizes."""
    rng, plans = random.Random(0), []
    room = Room(depth=4, rows=64)
    for _ in range(steps):
        step = p.plan(seqs, [room] * len(seqs))
        on = any(step.sizes)
        seconds = p.costs.step_time(step.sizes) * (cost_on if on else cost_off)
        observe(p, step, seqs, accepted=simulated_acceptance(rng, step.sizes, alpha), seconds=seconds)
        plans.append(step.sizes)
    return plans


@pytest.mark.unit
def test_cost_policy_for_chains_falls_to_plain_decoding_where_measured_steps_say_so():
    # the model is sure 4 draft tokens pay (cheap draft, high acceptance) but at 16 sequences the
    # machine's drafting steps take 3x what it predicts (plain ones what it predicts)
    p = cost_policy(alpha=0.8)
    seqs = [Seq(draft_tokens=4) for _ in range(16)]
    plans = [sum(g) for g in run_chains(p, seqs, 1000, 3.0, 1.0)]
    assert plans[0] > 1
    # after learning, only keep-alive probes (one sequence, one token): going back to drafting
    # with the whole batch would cost every sequence's catch-up
    assert max(plans[100:]) == 1 and plans[100:].count(1) <= 900 // p.probe_every + 1
    # a batch of one is another bucket, measured on its own: there the model's plan still runs
    assert plan(p, [Seq(draft_tokens=4)]).sizes[0] >= 3


@pytest.mark.unit
def test_cost_policy_for_chains_keeps_speculating_where_it_pays_and_measures_plain_steps_rarely():
    # drafting steps take 1.2x the prediction: speculation still pays at batch 1 with alpha 0.8
    p = cost_policy(alpha=0.8)
    plans = [any(g) for g in run_chains(p, [Seq(draft_tokens=4)], 400, 1.2, 1.0)]
    assert 400 // p.plain_every - 1 <= plans.count(False) <= 400 // p.plain_every + 3  # gaps 8, 16, 32, 64, 64 ...
    scale = p.clock_scale(1)
    assert scale[True] == pytest.approx(1.2, rel=0.01) and scale[False] == pytest.approx(1.0, rel=0.01)


@pytest.mark.unit
def test_batch_buckets_keep_a_serving_batch_in_one_bucket():
    assert len({batch_bucket(n) for n in range(12, 23)}) == 1  # 16 clients: 14-16 running
    assert len({batch_bucket(n) for n in (3, 4, 5)}) == 1
    assert batch_bucket(1) != batch_bucket(2) != batch_bucket(4) != batch_bucket(16)
