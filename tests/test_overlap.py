"""Overlap modes (pearl, branch): hedge branches drafted during verification stay lossless."""

import pytest

from hedgerow.drafting.spec import SpecMode, SpecParams
from hedgerow.verify.sampling import SamplingParams
from tests.tiny import (PROMPTS, VARIANTS, chi_square_check, exact_joint, hf_greedy, make_engine, perturbed_copy,
                        request, tiny_model)


@pytest.fixture(scope="module")
def pair(arch):
    target = tiny_model(arch, seed=0)
    return target, perturbed_copy(target, scale=0.02)


@VARIANTS
@pytest.mark.parametrize("overlap", ["pearl", "branch"])
def test_greedy_output_equals_the_target_batch_4_and_1(pair, overlap, impl):
    target, draft = pair
    refs = [hf_greedy(target, p, 30) for p in PROMPTS]
    out = make_engine(target, draft, overlap=overlap, gamma=3, impl=impl).generate(
        request(str(i), p, 30) for i, p in enumerate(PROMPTS)
    )
    assert [out[str(i)].generated for i in range(len(PROMPTS))] == refs
    solo = make_engine(target, draft, overlap=overlap, gamma=3, slots=1, impl=impl)
    for i, p in enumerate(PROMPTS):
        assert solo.generate([request("r", p, 30)])["r"].generated == refs[i]
    assert sum(s.stats.branches for s in out.values()) > 0


@VARIANTS
def test_draft_equal_to_target_hits_the_continuation_every_step(pair, impl):
    target, _ = pair
    model_only = SpecParams(mode=SpecMode.CHAIN, draft_tokens=3, proposer="model")  # no n-gram nodes beside it
    seq = make_engine(target, target, overlap="pearl", gamma=3, impl=impl).generate(
        [request("r", PROMPTS[0], 40, ignore_eos=True, spec=model_only)]
    )["r"]
    assert seq.stats.branch_hits == seq.stats.verify_steps - 1
    assert seq.stats.acceptance_rate == 1.0 and seq.num_generated == 40


@VARIANTS
def test_branch_alternatives_hit_with_a_close_draft(pair, impl):
    target, draft = pair
    out = make_engine(target, draft, overlap="branch", gamma=4, impl=impl).generate(
        request(str(i), p, 40, ignore_eos=True) for i, p in enumerate(PROMPTS)
    )
    assert sum(s.stats.branch_hits for s in out.values()) > 0


@pytest.mark.slow
@pytest.mark.parametrize("overlap", ["pearl", "branch"])
def test_sampled_overlap_draws_from_the_target_distribution(overlap, impl):
    """Three sampled tokens per request, so tails kept after a hit are verified and counted."""
    target = tiny_model("llama", seed=0)
    draft = perturbed_copy(target)
    sampling = SamplingParams(temperature=0.8, top_k=3)
    prompt = [5, 6, 7]
    engine = make_engine(target, draft, slots=16, overlap=overlap, gamma=2, impl=impl)
    spec = SpecParams(mode=SpecMode.CHAIN, draft_tokens=2)
    out = engine.generate(
        request(str(s), prompt, 4, sampling=SamplingParams(temperature=0.8, top_k=3, seed=s), spec=spec, ignore_eos=True)
        for s in range(800)
    )
    chi_square_check([tuple(s.generated[:3]) for s in out.values()], exact_joint(target, prompt, sampling, 3), overlap)
    assert sum(s.stats.branch_hits for s in out.values()) > 20, "the hit path was hardly exercised"
