"""The warping function against a direct reference, and the sampler's distribution."""

import pytest
import torch

from hedgerow.verify.sampling import SamplingParams, sample, warp_probs

pytestmark = pytest.mark.unit


def reference_warp(logits: torch.Tensor, t: float, k: int, p: float) -> torch.Tensor:
    """Plain-Python statement of the documented rule, one row."""
    vals = (logits.double() / t).tolist()
    order = sorted(range(len(vals)), key=lambda i: (-vals[i], i))
    keep = order[:k] if k else order
    z = torch.tensor([vals[i] for i in keep]).softmax(0).tolist()
    kept, mass = [], 0.0
    for i, pi in zip(keep, z):
        if mass >= p and kept:
            break
        kept.append(i)
        mass += pi
    out = torch.zeros(len(vals), dtype=torch.float64)
    w = torch.tensor([vals[i] for i in kept]).softmax(0)
    for i, wi in zip(kept, w):
        out[i] = wi
    return out


@pytest.mark.parametrize("t,k,p", [(1.0, 0, 1.0), (0.7, 3, 1.0), (1.3, 0, 0.6), (0.5, 4, 0.8), (2.0, 1, 0.9)])
def test_warp_matches_reference(t, k, p):
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        logits = torch.randn(9, generator=g) * 2
        got = warp_probs(logits, SamplingParams(temperature=t, top_k=k, top_p=p))
        assert torch.allclose(got.double(), reference_warp(logits, t, k, p), atol=1e-6)


def test_greedy_is_one_hot_at_first_argmax():
    logits = torch.tensor([0.1, 3.0, 3.0, -1.0])
    assert warp_probs(logits, SamplingParams()).tolist() == [0.0, 1.0, 0.0, 0.0]


@pytest.mark.parametrize("field,kwargs", [("temperature", {"temperature": -1}), ("top_k", {"top_k": -2}),
                                          ("top_p", {"top_p": 0.0}), ("top_p", {"top_p": 1.5})])
def test_impossible_parameters_name_the_field(field, kwargs):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_exponential_race_sampler_follows_the_distribution():
    probs = torch.tensor([0.5, 0.0, 0.3, 0.2])
    g = torch.Generator().manual_seed(1)
    draws = sample(probs.expand(40000, 4).clone(), g)
    freq = torch.bincount(draws, minlength=4).float() / 40000
    assert freq[1] == 0
    assert (freq - probs).abs().max() < 0.01
