"""Engine on tiny random models: losslessness against the target alone, acceptance, KV state."""

import pytest
import torch

from hedgerow.drafting.spec import SpecMode, SpecParams
from hedgerow.verify.flatten import flatten
from hedgerow.verify.sampling import SamplingParams
from hedgerow.verify.tree import DraftTree
from tests.tiny import (EOS, PROMPTS, VARIANTS, hf_greedy, make_engine, request, runner, tiny_model,
                        transformers_attention)

pytestmark = VARIANTS


@pytest.fixture(scope="module")
def pair(arch):
    return tiny_model(arch, seed=0), tiny_model(arch, seed=1, layers=1, hidden=32)


@pytest.fixture(scope="module")
def references(pair):
    target, _ = pair
    return [hf_greedy(target, p, 40) for p in PROMPTS]


@pytest.mark.parametrize("gamma", [1, 4, 8])
def test_greedy_chain_equals_target_generate_batch_of_4(pair, references, gamma, impl):
    target, draft = pair
    out = make_engine(target, draft, gamma=gamma, impl=impl).generate(request(str(i), p, 40) for i, p in enumerate(PROMPTS))
    for i in range(len(PROMPTS)):
        assert out[str(i)].generated == references[i], f"prompt {i}, gamma {gamma}"


@pytest.mark.parametrize("gamma", [1, 4, 8])
def test_greedy_chain_equals_target_generate_batch_of_1(pair, references, gamma, impl):
    target, draft = pair
    engine = make_engine(target, draft, gamma=gamma, slots=1, impl=impl)
    for i, p in enumerate(PROMPTS):
        assert engine.generate([request("r", p, 40)])["r"].generated == references[i]


def test_plain_decoding_equals_target_generate(pair, references, impl):
    target, _ = pair
    out = make_engine(target, None, mode=SpecMode.PLAIN, impl=impl).generate(request(str(i), p, 40) for i, p in enumerate(PROMPTS))
    assert [out[str(i)].generated for i in range(len(PROMPTS))] == references


@pytest.mark.parametrize("gamma", [1, 4, 8])
def test_draft_equal_to_target_accepts_everything(pair, gamma, impl):
    target, _ = pair
    model_only = SpecParams(mode=SpecMode.CHAIN, draft_tokens=gamma, proposer="model")  # no n-gram nodes beside it
    out = make_engine(target, target, gamma=gamma, impl=impl).generate(
        request(str(i), p, 37, ignore_eos=True, spec=model_only) for i, p in enumerate(PROMPTS)
    )
    for seq in out.values():
        stats = seq.stats
        assert stats.acceptance_rate == 1.0
        hist = dict(stats.emitted_per_step)
        # every step emits gamma + 1 tokens except the last, cut by max_new_tokens
        assert sum(hist.values()) == stats.verify_steps
        full_steps = 37 // (gamma + 1)
        assert hist[gamma + 1] == full_steps
        assert seq.num_generated == 37


def test_eos_stops_and_nothing_after_it_counts(pair, impl):
    target, draft = pair
    engine = make_engine(target, target, gamma=8, impl=impl)
    for i, p in enumerate(PROMPTS):
        ref = hf_greedy(target, p, 60)
        seq = engine.generate([request("r", p, 60)])["r"]
        assert seq.generated == ref
        if ref[-1] == EOS:
            assert seq.finish_reason.value == "eos"
            # draft == target: every step but the last keeps gamma accepted tokens + a bonus; the last
            # ends at EOS, which is either an accepted draft token or the bonus. Tokens the target
            # accepted after EOS would push the count past this window.
            low = seq.num_generated - seq.stats.verify_steps
            assert low <= seq.stats.accepted_tokens <= low + 1
        else:
            assert seq.finish_reason.value == "length"


@pytest.mark.parametrize("mode", [SpecMode.PLAIN, SpecMode.CHAIN])
def test_seeded_sampling_is_reproducible_and_batch_invariant(pair, mode, impl):
    target, draft = pair
    sp = SamplingParams(temperature=0.9, top_k=20, top_p=0.95, seed=1234)

    def run(batch_prompts):
        e = make_engine(target, draft if mode is SpecMode.CHAIN else None, mode=mode, impl=impl)
        return e.generate(request(str(i), p, 30, sampling=sp) for i, p in enumerate(batch_prompts))

    a, b = run(PROMPTS), run(PROMPTS)
    solo = run([PROMPTS[2]])
    assert [a[k].generated for k in a] == [b[k].generated for k in b]
    assert a["2"].generated == solo["0"].generated  # the batch does not change a seeded request
    other = make_engine(target, draft, impl=impl).generate(
        [request("x", PROMPTS[2], 30, sampling=SamplingParams(temperature=0.9, top_k=20, top_p=0.95, seed=99))]
    )
    assert other["x"].generated != a["2"].generated


def _plain_logits(model, tokens):
    with transformers_attention(model), torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].float()


def test_compaction_and_truncation_equal_recomputation(pair, impl):
    target, _ = pair
    run = runner(target, slots=3, max_len=64, impl=impl)
    prompt = [7, 8, 9, 10, 11, 12]
    slot = run.cache.allocate()
    run.extend([slot], [0], [prompt[:-1]], chunk=4)
    L = len(prompt) - 1
    # a tree under the root: keep path 0 -> 2 -> 5 (tokens 12, 31, 33)
    tree = DraftTree(torch.tensor([12, 30, 31, 32, 40, 33]), torch.tensor([-1, 0, 0, 1, 1, 2]))
    run.forward([slot], flatten([tree], [L]))
    run.cache.compact([slot], [[L + 0, L + 2, L + 5]], [L])
    kept = prompt + [31, 33]
    probe = DraftTree(torch.tensor([50, 51]), torch.tensor([-1, 0]))
    got = run.logits(run.forward([slot], flatten([probe], [len(kept)])))[0]
    want = _plain_logits(target, kept + [50, 51])[-2:]
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
    # truncation: forget the probe rows and write a different continuation over them
    probe2 = DraftTree(torch.tensor([60]), torch.tensor([-1]))
    got2 = run.logits(run.forward([slot], flatten([probe2], [len(kept)])))[0, 0]
    assert torch.allclose(got2, _plain_logits(target, kept + [60])[-1], atol=1e-5)


def test_ragged_batch_with_non_contiguous_slots(pair, impl):
    target, _ = pair
    run = runner(target, slots=4, max_len=64, impl=impl)
    slots = [run.cache.allocate() for _ in range(4)]
    a, b = [1, 2, 3, 4, 5, 6], [9, 8, 7]
    run.extend([slots[3], slots[1]], [0, 0], [a[:-1], b[:-1]], chunk=2)
    trees = [DraftTree(torch.tensor([6, 20, 21]), torch.tensor([-1, 0, 0])), DraftTree(torch.tensor([7]), torch.tensor([-1]))]
    got = run.logits(run.forward([slots[3], slots[1]], flatten(trees, [5, 2])))
    assert torch.allclose(got[0, 2], _plain_logits(target, a + [21])[-1], atol=1e-5)
    assert torch.allclose(got[1, 0], _plain_logits(target, b)[-1], atol=1e-5)


def test_finished_and_aborted_requests_free_their_slots(pair, impl):
    target, draft = pair
    engine = make_engine(target, draft, slots=2, impl=impl)
    engine.add_request(request("a", PROMPTS[0], 50))
    engine.add_request(request("b", PROMPTS[1], 3))
    engine.add_request(request("c", PROMPTS[2], 3))
    engine.step()
    assert engine.target.cache.slots_in_use == 2
    assert engine.abort("a")
    while engine.has_work():
        engine.step()
    assert engine.target.cache.slots_in_use == 0 and engine.draft.cache.slots_in_use == 0


def test_a_failing_request_fails_alone(pair, references, impl):
    """A forward that raises whenever one request is in it fails that request; its batch-mates
    finish with their exact greedy output and the engine keeps serving."""
    target, draft = pair
    engine = make_engine(target, draft, gamma=4, impl=impl)
    real_forward = engine.target.forward

    def forward(slots, flat):
        if bad.target_slot in slots:
            raise RuntimeError("poisoned request")
        return real_forward(slots, flat)

    engine.target.forward = forward
    for i, p in enumerate(PROMPTS):
        engine.add_request(request(str(i), p, 40))
    bad = engine.add_request(request("bad", [3, 9, 4], 40))
    errors, seqs = {}, {}
    while engine.has_work():
        for out in engine.step().outputs:
            seqs[out.request_id] = out.sequence
            if out.error:
                errors[out.request_id] = out.error
    assert list(errors) == ["bad"] and "poisoned request" in errors["bad"]
    assert [seqs[str(i)].generated for i in range(len(PROMPTS))] == references
    assert engine.target.cache.slots_in_use == 0 and engine.draft.cache.slots_in_use == 0
