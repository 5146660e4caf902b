"""Greedy draft runs (server/engine/greedy_run.py): a chain drafted in one or a few calls chooses the
tokens, returns the logits and writes the KV rows that the pass-per-token loop does, a call traces
whole with ``torch.compile(fullgraph=True)``, and the engine's greedy output is the target's with the
runs compiled (no recompile on the engine's inputs)."""

import pytest
import torch

from hedgerow.drafting.spec import SpecMode, SpecParams
from hedgerow.server.engine.greedy_run import CHUNKS, GreedyRuns, split
from hedgerow.server.engine.runner import ModelRunner
from hedgerow.server.models.native import from_transformers
from hedgerow.verify.flatten import flatten_chains
from tests.tiny import PROMPTS, hf_greedy, make_engine, request, tiny_model

BACKEND = "eager"  # traces as inductor would (a graph break fails it), without generating code


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def model(request):
    return tiny_model(request.param, seed=2, dtype=torch.float32)


def runner(model, impl: str = "native") -> ModelRunner:
    from hedgerow.server.models.hf import TransformersModel

    driven = from_transformers(model, 128) if impl == "native" else TransformersModel(model)
    return ModelRunner(driven, num_slots=4, max_len=128, name="draft")


def loop(run: ModelRunner, slots, starts, fed, tokens):
    """The reference: one pass for the fed tokens, then one pass per drafted token."""
    hidden = run.extend(slots, starts, fed, chunk=64)
    logits = run.logits(hidden)
    out, all_logits = [[] for _ in slots], []
    for j in range(tokens):
        all_logits.append(logits)
        for i, t in enumerate(logits.argmax(-1).tolist()):
            out[i].append(t)
        if j + 1 == tokens:
            break
        flat = flatten_chains([[o[-1]] for o in out], [s + len(f) + j for s, f in zip(starts, fed)])
        logits = run.logits(run.forward(slots, flat))[:, 0]
    return out, torch.stack(all_logits, 1)


@pytest.mark.unit
def test_a_chain_is_split_into_the_fewest_chunks():
    assert split(1) == [1] and split(4) == [4] and split(6) == [4, 1, 1] and split(9) == [4, 4, 1]
    assert all(sum(split(n)) == n for n in range(1, 40)) and CHUNKS[-1] == 1


@pytest.mark.engine
@pytest.mark.parametrize("impl", ["native", "transformers"])
@pytest.mark.parametrize("tokens", [1, 4, 6])
def test_a_greedy_run_is_the_pass_per_token_loop(model, impl, tokens):
    # ragged catch-ups (1, 3 and 2 tokens) after ragged prefixes, in slots that are not in order
    prompts = [PROMPTS[0], PROMPTS[2], PROMPTS[2][:7]]
    slots, starts = [2, 0, 1], [len(p) - n for p, n in zip(prompts, (1, 3, 2))]
    fed = [p[s:] for p, s in zip(prompts, starts)]
    runs = [runner(model, impl) for _ in range(2)]
    for run in runs:  # the same prefixes in both caches
        run.extend(slots, [0] * 3, [p[:s] for p, s in zip(prompts, starts)], chunk=64)
    want_tokens, want_logits = loop(runs[0], slots, starts, fed, tokens)
    got_tokens, got_logits = runs[1].greedy_chains(slots, starts, fed, tokens, runs[1].vocab_size)
    assert got_tokens == want_tokens
    torch.testing.assert_close(got_logits, want_logits, rtol=1e-4, atol=1e-4)
    for layer in range(len(runs[0].cache.keys)):  # the same rows written: the fed tokens' and all drafted but the last
        for s, start, f in zip(slots, starts, fed):
            end = start + len(f) + tokens - 1
            torch.testing.assert_close(runs[1].cache.keys[layer][s, :, :end], runs[0].cache.keys[layer][s, :, :end])
            torch.testing.assert_close(runs[1].cache.values[layer][s, :, :end], runs[0].cache.values[layer][s, :, :end])


@pytest.mark.engine
def test_a_greedy_run_refuses_to_write_past_the_cache(model):
    run = runner(model)
    with pytest.raises(ValueError, match="greedy run needs 129 KV rows, the cache holds 128"):
        run.greedy_chains([0], [120], [[5, 6]], 8, run.vocab_size)


@pytest.mark.engine
@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("width", [1, 2])
def test_a_greedy_call_traces_whole_and_computes_what_eager_does(model, rows, width):
    run = runner(model)
    runs = GreedyRuns(run.model, run.cache, run._attend, "draft", BACKEND)
    args = runs._example(CHUNKS[0], rows, width, run.vocab_size, run.cache.scratch_slot)
    with torch.inference_mode():
        eager = runs.eager[CHUNKS[0]](*args)
        traced = runs.compiled[CHUNKS[0]](*args)  # fullgraph: raises on a graph break
    assert torch.equal(traced[0], eager[0]) and torch.equal(traced[1], eager[1])


@pytest.mark.slow
def test_compiled_greedy_runs_keep_the_engines_greedy_output_equal_to_the_target():
    target = tiny_model("llama", seed=0, dtype=torch.float32)
    draft = tiny_model("llama", seed=3, layers=1, hidden=32, dtype=torch.float32)
    refs = [hf_greedy(target, p, 24) for p in PROMPTS]
    engine = make_engine(target, draft, impl="native")
    d = engine.draft
    d.greedy = GreedyRuns(d.model, d.cache, d._attend, d.name, BACKEND)
    d.greedy.prepare(d.vocab_size, measure=False)
    assert len(d.greedy.enabled) == 4 * len(CHUNKS)
    with torch._dynamo.config.patch(error_on_recompile=True):  # every call hits a graph compiled above
        for gamma in (1, 4, 6):
            spec = SpecParams(mode=SpecMode.CHAIN, draft_tokens=gamma)
            out = engine.generate(request(f"{gamma}-{i}", p, 24, spec=spec) for i, p in enumerate(PROMPTS))
            assert [out[f"{gamma}-{i}"].generated for i in range(len(PROMPTS))] == refs
            alone = engine.generate([request(f"{gamma}-alone", PROMPTS[0], 24, spec=spec)])  # one row: [1, 1] inputs
            assert alone[f"{gamma}-alone"].generated == refs[0]
    assert len(d.greedy.enabled) == 4 * len(CHUNKS)
