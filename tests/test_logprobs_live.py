"""Logprobs on the wire (conftest's ``backend``: the tiny folder pair, text prompts): over gRPC, unary
and streamed, every token of token_ids has the target's raw logprob and its top alternatives, equal
within 1e-5 to transformers' forward pass over the same tokens, under plain decoding and
speculation alike; through the proxy, with the official client, completions (``logprobs: k``) and
chat (``logprobs: true``, ``top_logprobs``), streamed and not, carry the same numbers."""

from __future__ import annotations

import grpc
import pytest
import torch

from hedgerow.server.rpc import generation_pb2 as pb
from tests.live import LiveProxy

openai = pytest.importorskip("openai", reason="the proxy tests drive the official client: pip install openai")
pytestmark = pytest.mark.live

PROMPT = "def fibonacci(n):"
N = 16
K = 3


@pytest.fixture(scope="module")
def hf_target(tiny_folders):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(tiny_folders["target"]), attn_implementation="sdpa").eval()


@pytest.fixture(scope="module")
def chat_proxy(backend, chat_tokenizer):
    with LiveProxy(backend.address, tokenizer=str(chat_tokenizer)) as p:
        yield p


def reference(hf_target, prompt_ids: list[int], tokens: list[int], k: int = K):
    with torch.no_grad():
        logits = hf_target(torch.tensor([prompt_ids + tokens])).logits[0, len(prompt_ids) - 1 : -1].float()
    rows = torch.log_softmax(logits, -1)
    values, ids = rows.topk(k, -1)
    return rows.gather(1, torch.tensor(tokens)[:, None])[:, 0].tolist(), ids.tolist(), values.tolist()


def request(prompt, mode, k=K, **sampling) -> pb.GenerateRequest:
    msg = pb.GenerateRequest(stopping=pb.StoppingCriteria(max_new_tokens=N), logprobs=True, top_logprobs=k)
    if isinstance(prompt, str):
        msg.prompt = prompt
    else:
        msg.prompt_token_ids.extend(prompt)
    msg.speculation.mode = mode
    for name, value in sampling.items():
        setattr(msg.sampling, name, value)
    return msg


def assert_matches(entries, tokens, want, tokenizer):
    lps, ids, values = want
    assert [e.token_id for e in entries] == tokens
    for j, e in enumerate(entries):
        assert abs(e.logprob - lps[j]) < 1e-5, (j, e.logprob, lps[j])
        assert [a.token_id for a in e.top_logprobs] == ids[j]
        assert max(abs(a.logprob - v) for a, v in zip(e.top_logprobs, values[j])) < 1e-5
        assert e.token == tokenizer.decode([e.token_id])


@pytest.mark.parametrize("mode", [pb.SPECULATION_MODE_PLAIN, pb.SPECULATION_MODE_CHAIN, pb.SPECULATION_MODE_TREE])
@pytest.mark.parametrize("sampling", [{}, {"temperature": 0.9, "seed": 3}], ids=["greedy", "seeded"])
def test_grpc_logprobs_are_the_targets_for_every_token(backend, hf_target, mode, sampling):
    prompt_ids = backend.tokenizer.encode(PROMPT)
    out = backend.stub.Generate(request(PROMPT, mode, **sampling), timeout=60)
    tokens = list(out.token_ids)
    assert len(out.logprobs) == len(tokens) > 0
    assert_matches(out.logprobs, tokens, reference(hf_target, prompt_ids, tokens), backend.tokenizer)
    msgs = list(backend.stub.GenerateStream(request(PROMPT, mode, **sampling), timeout=60))
    assert all(len(m.logprobs) == len(m.token_ids) for m in msgs)
    assert [e.SerializeToString() for m in msgs for e in m.logprobs] == [e.SerializeToString() for e in out.logprobs]
    plain = backend.stub.Generate(pb.GenerateRequest(prompt=PROMPT, stopping=pb.StoppingCriteria(max_new_tokens=4)),
                                  timeout=60)
    assert len(plain.logprobs) == 0  # not asked


def test_grpc_refuses_bad_logprob_requests(backend):
    for msg, words in ((pb.GenerateRequest(prompt="x", top_logprobs=2), "top_logprobs needs logprobs"),
                       (pb.GenerateRequest(prompt="x", logprobs=True, top_logprobs=21),
                        "top_logprobs must be in [0, 20], got 21")):
        with pytest.raises(grpc.RpcError) as err:
            backend.stub.Generate(msg, timeout=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and err.value.details() == words


def test_completions_logprobs_with_the_official_client(backend, proxy, model, hf_target):
    client = proxy.client()
    prompt_ids = backend.tokenizer.encode(PROMPT)
    ref = backend.stub.Generate(request(PROMPT, pb.SPECULATION_MODE_CHAIN), timeout=60)
    tokens = list(ref.token_ids)
    lps, ids, values = reference(hf_target, prompt_ids, tokens)
    out = client.completions.create(model=model, prompt=PROMPT, max_tokens=N, temperature=0, logprobs=K)
    lp = out.choices[0].logprobs
    assert lp.tokens == [backend.tokenizer.decode([t]) for t in tokens]
    assert max(abs(a - b) for a, b in zip(lp.token_logprobs, lps)) < 1e-5
    for j, top in enumerate(lp.top_logprobs):  # a dict by text: tokens that decode alike share a key
        want = {}
        for t, v in zip(ids[j], values[j]):
            want.setdefault(backend.tokenizer.decode([t]), []).append(v)
        assert set(top) == set(want) and all(min(abs(top[key] - v) for v in vs) < 1e-5 for key, vs in want.items())
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:j]) for j in range(len(tokens))]
    chunks = list(client.completions.create(model=model, prompt=PROMPT, max_tokens=N, temperature=0, logprobs=K,
                                            stream=True))
    streamed = [x for c in chunks if c.choices and c.choices[0].logprobs for x in c.choices[0].logprobs.token_logprobs]
    offsets = [x for c in chunks if c.choices and c.choices[0].logprobs for x in c.choices[0].logprobs.text_offset]
    assert streamed == lp.token_logprobs and offsets == lp.text_offset
    none = client.completions.create(model=model, prompt=PROMPT, max_tokens=4, temperature=0)
    assert none.choices[0].logprobs is None


def test_chat_logprobs_with_the_official_client(backend, chat_proxy, model, hf_target):
    client = chat_proxy.client()
    messages = [{"role": "user", "content": "def add"}]
    rendered = backend.tokenizer.encode("<user>def add\n<assistant>")
    out = client.chat.completions.create(model=model, messages=messages, max_tokens=N, temperature=0, logprobs=True,
                                         top_logprobs=2)
    content = out.choices[0].logprobs.content
    ref = backend.stub.Generate(request(rendered, pb.SPECULATION_MODE_CHAIN, k=2), timeout=60)
    tokens = list(ref.token_ids)
    lps, ids, values = reference(hf_target, rendered, tokens, 2)
    assert [c.token for c in content] == [backend.tokenizer.decode([t]) for t in tokens]
    assert max(abs(c.logprob - w) for c, w in zip(content, lps)) < 1e-5
    for c, top_values in zip(content, values):
        assert len(c.top_logprobs) == 2 and max(abs(a.logprob - v) for a, v in zip(c.top_logprobs, top_values)) < 1e-5
        assert c.bytes == list(c.token.encode())
    chunks = list(client.chat.completions.create(model=model, messages=messages, max_tokens=N, temperature=0,
                                                 logprobs=True, top_logprobs=2, stream=True))
    streamed = [x.logprob for c in chunks if c.choices and c.choices[0].logprobs for x in c.choices[0].logprobs.content]
    assert streamed == [c.logprob for c in content]
