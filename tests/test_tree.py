"""Token trees: one tree pass equals per-path recomputation; greedy trees equal the target alone;
sampled trees (and chains) draw from the target's distribution, end to end through the engine."""

import pytest
import torch

from hedgerow.drafting.spec import SpecMode, SpecParams
from hedgerow.drafting.tree import static_shape
from hedgerow.verify.flatten import flatten
from hedgerow.verify.sampling import SamplingParams
from hedgerow.verify.tree import DraftTree
from tests.tiny import (PROMPTS, VARIANTS, chi_square_check, exact_joint, hf_greedy, last_logits, make_engine,
                        perturbed_copy, request, runner, tiny_model)

DYNAMIC = SpecParams(mode=SpecMode.TREE, tree_budget=12, tree_depth=4, tree_topk=3)
STATIC = SpecParams(mode=SpecMode.TREE, tree_budget=10, tree_depth=4, tree_topk=3, tree_static=True)


@pytest.fixture(scope="module")
def pair(arch):
    return tiny_model(arch, seed=0), tiny_model(arch, seed=1, layers=1, hidden=32)


@VARIANTS
def test_tree_pass_equals_each_root_to_node_path(arch, impl):
    target = tiny_model(arch, seed=0, dtype=torch.float32)
    run = runner(target, slots=3, max_len=64, impl=impl)
    prompts = [[1, 2, 3, 4, 5, 6, 7], [8, 9, 10], [11, 12, 13, 14, 15]]
    trees = [
        DraftTree(torch.tensor([7, 20, 21, 22, 23, 24]), torch.tensor([-1, 0, 0, 1, 1, 3])),
        DraftTree(torch.tensor([10, 30]), torch.tensor([-1, 0])),
        DraftTree(torch.tensor([15, 40, 41, 42]), torch.tensor([-1, 0, 0, 0])),
    ]
    slots = [run.cache.allocate() for _ in prompts]
    run.extend(slots, [0] * 3, [p[:-1] for p in prompts], chunk=4)
    logits = run.logits(run.forward(slots, flatten(trees, [len(p) - 1 for p in prompts])))
    for b, (p, tree) in enumerate(zip(prompts, trees)):
        parents, tokens = tree.parents.tolist(), tree.tokens.tolist()
        for i in range(len(tokens)):
            path = [i]
            while parents[path[-1]] >= 0:
                path.append(parents[path[-1]])
            want = last_logits(target, p[:-1] + [tokens[j] for j in reversed(path)])
            err = (logits[b, i] - want).abs().max().item()
            assert err < 1e-4, f"sequence {b} node {i}: max abs diff {err}"


@VARIANTS
@pytest.mark.parametrize("spec", [DYNAMIC, STATIC], ids=["dynamic", "static"])
def test_greedy_tree_equals_target_generate(pair, spec, impl):
    target, draft = pair
    refs = [hf_greedy(target, p, 30) for p in PROMPTS]
    out = make_engine(target, draft, impl=impl).generate(request(str(i), p, 30, spec=spec) for i, p in enumerate(PROMPTS))
    assert [out[str(i)].generated for i in range(len(PROMPTS))] == refs
    solo = make_engine(target, draft, slots=1, impl=impl)
    for i, p in enumerate(PROMPTS):
        assert solo.generate([request("r", p, 30, spec=spec)])["r"].generated == refs[i]


@VARIANTS
def test_draft_equal_to_target_tree_accepts_the_full_depth(pair, impl):
    target, _ = pair
    spec = SpecParams(mode=SpecMode.TREE, tree_budget=8, tree_depth=3, tree_topk=2, tree_static=True)
    seq = make_engine(target, target, impl=impl).generate([request("r", PROMPTS[0], 40, spec=spec, ignore_eos=True)])["r"]
    assert seq.stats.emitted_per_step[4] == 10  # the top-1 path is the target's own: depth 3 + bonus, every step


@pytest.mark.unit
def test_static_shape_is_closed_under_ancestors_and_lower_siblings():
    paths = static_shape(12, 4, 3)
    assert len(paths) == 12 and len(set(paths)) == 12
    for p in paths:
        assert max(len(p) for p in paths) <= 4
        if len(p) > 1:
            assert p[:-1] in paths
        if p[-1] > 0:
            assert p[:-1] + (p[-1] - 1,) in paths


# --- sampling, end to end -------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize(
    "mode,spec",
    [
        ("chain", SpecParams(mode=SpecMode.CHAIN, draft_tokens=3)),
        ("dynamic tree", SpecParams(mode=SpecMode.TREE, tree_budget=6, tree_depth=2, tree_topk=2)),
        ("static tree", SpecParams(mode=SpecMode.TREE, tree_budget=6, tree_depth=2, tree_topk=2, tree_static=True)),
    ],
)
def test_sampled_speculation_draws_from_the_target_distribution(mode, spec, impl):
    """600 seeded requests; chi-square of the first two tokens against the exact joint. The draft
    is a perturbed copy of the target, so acceptance and rejection both happen often."""
    target = tiny_model("llama", seed=0)
    draft = perturbed_copy(target)
    sampling = SamplingParams(temperature=0.8, top_k=3)
    prompt = [5, 6, 7]
    engine = make_engine(target, draft, slots=16, impl=impl)
    out = engine.generate(
        request(str(s), prompt, 2, sampling=SamplingParams(temperature=0.8, top_k=3, seed=s), spec=spec, ignore_eos=True)
        for s in range(600)
    )
    chi_square_check([tuple(s.generated) for s in out.values()], exact_joint(target, prompt, sampling, 2), mode)
    accepted = sum(s.stats.accepted_tokens for s in out.values())
    drafted = sum(s.stats.draft_tokens for s in out.values())
    assert 0.05 * drafted < accepted < 0.95 * drafted, f"{mode}: acceptance {accepted}/{drafted} tests too little"
