"""Tiny positive temperatures decode as their limit, greedy decoding, in every mode through the
engine (docs/algorithms.md §1.3): below float32's smallest normal number they are greedy, and above
it the shifted division keeps the scaled logits finite, so the one-hot limit is what gets sampled."""

import pytest
import torch

from hedgerow.drafting.spec import SpecMode, SpecParams
from hedgerow.verify.sampling import GREEDY_BELOW, SamplingParams, warp_probs
from tests.tiny import PROMPTS, hf_greedy, make_engine, perturbed_copy, request, tiny_model

TINY = [5e-324, 1e-45, 1e-40, 1e-38, 2e-38, 1e-37, 1e-36]  # around and below 2**-126 ≈ 1.18e-38
MODES = {  # name -> (engine options, per-request speculation)
    "plain": ({"mode": SpecMode.PLAIN}, SpecParams(mode=SpecMode.PLAIN)),
    "chain": ({}, SpecParams(mode=SpecMode.CHAIN, draft_tokens=4)),
    "tree": ({}, SpecParams(mode=SpecMode.TREE, tree_budget=8, tree_depth=4)),
    "static tree": ({}, SpecParams(mode=SpecMode.TREE, tree_budget=8, tree_depth=3, tree_static=True)),
    "chain, overlap branch": ({"overlap": "branch"}, SpecParams(mode=SpecMode.CHAIN, draft_tokens=4)),
}


@pytest.fixture(scope="module")
def references():
    target = tiny_model("llama", seed=0)
    return [hf_greedy(target, p, 20) for p in PROMPTS]


@pytest.mark.unit
def test_the_warped_distribution_stays_a_distribution_down_to_zero():
    logits = torch.tensor([[3.0, 7.5, -2.0, 7.5 - 1e-5], [-40.0, 12.0, 11.0, 0.0]])
    for t in TINY + [GREEDY_BELOW, 1e-30, 1e-6]:
        for top_k, top_p in ((0, 1.0), (2, 1.0), (0, 0.5)):
            p = warp_probs(logits, SamplingParams(temperature=t, top_k=top_k, top_p=top_p))
            assert torch.isfinite(p).all() and torch.allclose(p.sum(-1), torch.ones(2)), (t, top_k, top_p)
            assert p.argmax(-1).tolist() == [1, 1] and p[1, 1] == 1.0, (t, p)
    assert SamplingParams(temperature=GREEDY_BELOW / 2).greedy and not SamplingParams(temperature=GREEDY_BELOW).greedy


@pytest.mark.engine
@pytest.mark.parametrize("mode", list(MODES))
def test_a_tiny_temperature_gives_the_greedy_output(mode, references):
    options, spec = MODES[mode]
    target = tiny_model("llama", seed=0)
    draft = None if mode == "plain" else perturbed_copy(tiny_model("llama", seed=0))
    engine = make_engine(target, draft, **options)
    for t in TINY:
        sampling = SamplingParams(temperature=t, top_k=20 if t > 1e-37 else 0, seed=3)
        out = engine.generate(request(str(i), p, 20, sampling=sampling, spec=spec) for i, p in enumerate(PROMPTS))
        assert [out[str(i)].generated for i in range(len(PROMPTS))] == references, f"temperature {t:g}"
