"""n samples of a request in the engine: the samples forked from sample 0 copy its prompt KV instead of
prefilling it (one prefill for n samples), and each gives exactly what a separately prefilled single
request with its derived seed gives: greedy and sampled, chain and tree, beside a batch-mate."""

from dataclasses import replace

import pytest
import torch

from hedgerow.drafting.spec import SpecMode, SpecParams
from hedgerow.server.engine.samples import MAX_SAMPLES, sample_requests, sample_seed
from hedgerow.verify.sampling import SamplingParams
from tests.tiny import PROMPTS, VARIANTS, make_engine, perturbed_copy, request, runner, tiny_model

pytestmark = VARIANTS

SPECS = {"chain": SpecParams(mode=SpecMode.CHAIN, draft_tokens=4),
         "tree": SpecParams(mode=SpecMode.TREE, tree_budget=8, tree_depth=3, tree_topk=2)}
SAMPLINGS = {"greedy": SamplingParams(), "sampled": SamplingParams(temperature=0.9, top_k=20, seed=1234)}


@pytest.fixture(scope="module")
def pair(arch):
    target = tiny_model(arch, seed=0)
    return target, perturbed_copy(target)  # accepts about half: compaction runs on the forked slots


def count_prefill(engine) -> dict[str, int]:
    """Prompt tokens each runner's ``extend`` computes (prefill and the draft's catch-up)."""
    counts = {"target": 0, "draft": 0}
    for name, run in (("target", engine.target), ("draft", engine.draft)):
        extend = run.extend

        def counted(slots, prefix_lens, chains, chunk, extend=extend, name=name):
            counts[name] += sum(map(len, chains))
            return extend(slots, prefix_lens, chains, chunk)

        run.extend = counted
    return counts


def solo(pair, impl, req):
    """``req`` alone in an engine of its own: prefilled by itself."""
    target, draft = pair
    return make_engine(target, draft, impl=impl).generate([replace(req, fork_of=None)])[req.request_id].generated


@pytest.mark.parametrize("spec", list(SPECS))
@pytest.mark.parametrize("sampling", list(SAMPLINGS))
def test_forked_samples_equal_separately_prefilled_requests(pair, impl, spec, sampling):
    target, draft = pair
    prompt, mate = PROMPTS[2], PROMPTS[0]
    samples = sample_requests(request("r", prompt, 20, sampling=SAMPLINGS[sampling], spec=SPECS[spec]), 3)
    assert [r.request_id for r in samples] == ["r", "r#1", "r#2"] and [r.fork_of for r in samples] == [None, "r", "r"]
    engine = make_engine(target, draft, impl=impl)
    counts = count_prefill(engine)
    out = engine.generate([*samples, request("mate", mate, 20, sampling=SAMPLINGS[sampling], spec=SPECS[spec])])
    # one prefill of the prompt (and of the batch-mate's), in the target and in the draft
    assert counts["target"] == len(prompt) - 1 + len(mate) - 1
    assert counts["draft"] >= len(prompt) - 1 + len(mate) - 1  # plus the draft's catch-up after a step
    got = [out[r.request_id].generated for r in samples]
    assert got == [solo(pair, impl, r) for r in samples]
    if sampling == "sampled":
        assert [r.sampling.seed for r in samples] == [1234, 1235, 1236]
        assert len({tuple(g) for g in got}) > 1, "independent seeds should not all draw alike"
    else:
        assert got[0] == got[1] == got[2]
    assert engine.target.cache.slots_in_use == 0 and engine.draft.cache.slots_in_use == 0


def test_a_fork_admitted_later_copies_a_running_source(pair, impl):
    """The source has decoded a few steps (its slot holds more than the prompt): the fork copies the
    prompt rows only and still gives its solo output; a fork whose source is gone prefills itself."""
    target, draft = pair
    sp = SamplingParams(temperature=0.8, seed=7)
    first, second = sample_requests(request("s", PROMPTS[2], 16, sampling=sp), 2)
    engine = make_engine(target, draft, impl=impl)
    counts = count_prefill(engine)
    engine.add_request(first)
    for _ in range(3):
        engine.step()
    before = counts["target"]
    late = engine.generate([second])
    assert counts["target"] == before  # copied, not computed
    assert late[second.request_id].generated == solo(pair, impl, second)
    orphan = replace(second, request_id="orphan", fork_of="gone")
    assert engine.generate([orphan])["orphan"].generated == solo(pair, impl, second)
    assert counts["target"] == before + len(PROMPTS[2]) - 1


def test_copy_rows_copies_the_prompt_kv_exactly(pair, impl):
    target, _ = pair
    run = runner(target, slots=3, max_len=64, impl=impl)
    a, b, c = (run.cache.allocate() for _ in range(3))
    prompt = [3, 4, 5, 6, 7, 8]
    run.extend([a], [0], [prompt], chunk=4)
    run.extend([c], [0], [[9, 9, 9, 9, 9, 9, 9, 9]], chunk=4)  # rows the copy must overwrite, and one it must not
    run.cache.copy_rows(a, c, len(prompt))
    run.cache.copy_rows(a, b, len(prompt))
    for keys, values in zip(run.cache.keys, run.cache.values):
        for dst in (b, c):
            assert torch.equal(keys[dst, :, : len(prompt)], keys[a, :, : len(prompt)])
            assert torch.equal(values[dst, :, : len(prompt)], values[a, :, : len(prompt)])
        assert not torch.equal(keys[c, :, len(prompt)], keys[a, :, len(prompt)])


def test_sample_seeds_and_bounds(arch, impl):
    assert [sample_seed(5, i) for i in range(3)] == [5, 6, 7]
    assert sample_seed(2**63 - 1, 1) == 0  # seeds stay in [0, 2^63)
    unseeded = sample_requests(request("u", [1, 2], 4, sampling=SamplingParams(temperature=1.0)), 2)
    assert all(r.sampling.seed is None for r in unseeded)  # each draws a random seed of its own
    for bad in (0, MAX_SAMPLES + 1):
        with pytest.raises(ValueError, match="n must be in"):
            sample_requests(request("u", [1, 2], 4), bad)
