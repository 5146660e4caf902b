"""Logprobs under speculation are exact: the target's raw log-softmax at every emitted token, read
off the verify pass, equals what plain decoding reports and what transformers computes for the same
tokens on the target alone (``output_logits`` of its own ``generate`` for greedy output, a forward
pass over the sampled text otherwise), within 1e-5, with the same top-k alternatives; for every
mode (chain, dynamic and static tree) and proposer (model, ngram, hybrid).

Seeded sampling draws different tokens with and without speculation (the random streams are used
differently), so there each run's logprobs are checked against the target's own for its tokens,
which is exactly what plain decoding would report for them."""

import pytest
import torch

from hedgerow.drafting.spec import SpecMode, SpecParams
from hedgerow.server.errors import HedgerowError
from hedgerow.verify.logprobs import token_logprobs
from hedgerow.verify.sampling import SamplingParams
from tests.tiny import EOS, PROMPTS, make_engine, request, tiny_model, transformers_attention

N = 20
K = 5
LOOPING = 2  # a target that repeats itself on some prompts, so n-gram drafts are accepted


@pytest.fixture(scope="module")
def pair():
    return tiny_model("llama", seed=LOOPING, dtype=torch.float32), tiny_model("llama", seed=1, layers=1, hidden=32,
                                                                               dtype=torch.float32)


def spec(mode: str, proposer: str | None) -> SpecParams:
    if mode == "plain":
        return SpecParams(mode=SpecMode.PLAIN)
    if mode == "chain":
        return SpecParams(mode=SpecMode.CHAIN, draft_tokens=4, proposer=proposer)
    return SpecParams(mode=SpecMode.TREE, tree_budget=10, tree_depth=4, tree_topk=3, tree_static=mode == "static",
                      proposer=proposer)


def run(pair, sp: SpecParams, sampling=SamplingParams(), k=K):
    target, draft = pair
    engine = make_engine(target, draft)
    reqs = [request(str(i), p, N, sampling=sampling, spec=sp, logprobs=k) for i, p in enumerate(PROMPTS)]
    rid_logprobs = {r.request_id: [] for r in reqs}
    for r in reqs:
        engine.add_request(r)
    tokens = {r.request_id: [] for r in reqs}
    while engine.has_work():
        for out in engine.step().outputs:
            assert out.error is None
            tokens[out.request_id] += out.token_ids
            rid_logprobs[out.request_id] += out.logprobs or []
    return [(tokens[str(i)], rid_logprobs[str(i)]) for i in range(len(PROMPTS))]


def reference(target, prompt, tokens, k=K):
    """The target alone through transformers: its log-softmax at each of ``tokens`` and the top k."""
    with transformers_attention(target), torch.no_grad():
        logits = target(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1 : -1].float()
    rows = torch.log_softmax(logits, -1)
    values, ids = rows.topk(k, -1)
    return rows.gather(1, torch.tensor(tokens)[:, None])[:, 0].tolist(), ids.tolist(), values.tolist()


def assert_exact(got, want_lp, want_ids, want_values, label):
    for j, e in enumerate(got):
        assert abs(e.logprob - want_lp[j]) < 1e-5, f"{label} token {j}: {e.logprob} vs {want_lp[j]}"
        assert [t for t, _ in e.top] == want_ids[j], f"{label} token {j}: top ids"
        assert max(abs(v - w) for (_, v), w in zip(e.top, want_values[j])) < 1e-5, f"{label} token {j}: top values"


def hf_generate_logprobs(target, prompt, n):
    """transformers' own greedy generate with ``output_logits``: the tokens and their logprobs."""
    with transformers_attention(target), torch.no_grad():
        out = target.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                              max_new_tokens=n, do_sample=False, eos_token_id=EOS, pad_token_id=0,
                              output_logits=True, return_dict_in_generate=True)
    tokens = out.sequences[0, len(prompt):].tolist()
    rows = torch.log_softmax(torch.stack(out.logits)[:, 0].float(), -1)
    if EOS in tokens:
        tokens = tokens[: tokens.index(EOS) + 1]
    return tokens, [float(rows[j, t]) for j, t in enumerate(tokens)]


@pytest.fixture(scope="module")
def plain_greedy(pair):
    return run(pair, spec("plain", None))


MODES = [(m, p) for m in ("chain", "tree", "static") for p in ("model", "ngram", "hybrid")]


@pytest.mark.engine
@pytest.mark.parametrize(("mode", "proposer"), MODES)
def test_greedy_logprobs_under_speculation_equal_plain_decoding_and_transformers(pair, plain_greedy, mode, proposer):
    got = run(pair, spec(mode, proposer))
    for i, ((tokens, lps), (ptokens, plps)) in enumerate(zip(got, plain_greedy)):
        assert tokens == ptokens and len(lps) == len(tokens)
        for j, (a, b) in enumerate(zip(lps, plps)):
            assert abs(a.logprob - b.logprob) < 1e-5, (i, j)
            assert [t for t, _ in a.top] == [t for t, _ in b.top]
            assert max(abs(x - y) for (_, x), (_, y) in zip(a.top, b.top)) < 1e-5
        hf_tokens, hf_lps = hf_generate_logprobs(pair[0], PROMPTS[i], N)
        assert hf_tokens == tokens
        assert max(abs(a.logprob - b) for a, b in zip(lps, hf_lps)) < 1e-5, f"prompt {i}"
        assert_exact(lps, *reference(pair[0], PROMPTS[i], tokens), f"{mode}/{proposer} prompt {i}")


@pytest.mark.engine
@pytest.mark.parametrize(("mode", "proposer"), [("plain", None)] + MODES)
def test_sampled_logprobs_are_the_targets_raw_logprobs_of_the_drawn_tokens(pair, mode, proposer):
    sampling = SamplingParams(temperature=0.8, top_k=20, top_p=0.9, seed=7)
    for i, (tokens, lps) in enumerate(run(pair, spec(mode, proposer), sampling)):
        assert [e.token_id for e in lps] == tokens
        assert_exact(lps, *reference(pair[0], PROMPTS[i], tokens), f"{mode}/{proposer} prompt {i}")


@pytest.mark.engine
def test_no_logprobs_unless_asked_and_k_is_bounded(pair):
    target, draft = pair
    engine = make_engine(target, draft)
    engine.add_request(request("a", PROMPTS[0], 4))
    while engine.has_work():
        assert all(o.logprobs is None for o in engine.step().outputs)
    with pytest.raises(HedgerowError, match=r"top_logprobs must be in \[0, 20\], got 21"):
        engine.add_request(request("b", PROMPTS[0], 4, logprobs=21))
    (tokens, lps), *_ = run(pair, spec("chain", "model"), k=0)
    assert all(e.top == () for e in lps) and len(lps) == len(tokens)


@pytest.mark.unit
def test_token_j_is_read_from_the_row_of_path_j():
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.25], [0.1, 0.1, 0.8], [0.2, 0.6, 0.2]]))
    out = token_logprobs(logits, [0, 2], [2, 1], 2)
    assert [e.token_id for e in out] == [2, 1]
    assert out[0].logprob == pytest.approx(torch.log(torch.tensor(0.25)).item())
    assert out[1].logprob == pytest.approx(torch.log(torch.tensor(0.6)).item())
    assert [t for t, _ in out[1].top] == [1, 0] or [t for t, _ in out[1].top] == [1, 2]
