"""n choices and prompt batches through the proxy, with the official client (conftest's ``backend``,
``proxy``, ``client``, ``model``): with a seed s, choice i of n is exactly the single request seeded
s + i, for completions and chat; a batch of prompts gives choice p * n + i for prompt p's sample i,
each equal to its single request; streams carry each chunk's choice index and add up to the same
choices; usage sums over the choices; a bad n or an oversized batch is a 400 naming the parameter."""

from __future__ import annotations

import pytest

from hedgerow.server.service.requests import ServiceConfig
from tests.live import LiveProxy, text_server

openai = pytest.importorskip("openai", reason="the proxy tests drive the official client: pip install openai")
pytestmark = pytest.mark.live

PROMPT = "def fibonacci(n):"
SEED = 11
SAMPLED = {"temperature": 0.9, "max_tokens": 12}
MESSAGES = [{"role": "user", "content": "def add"}]


@pytest.fixture(scope="module")
def chat_client(backend, chat_tokenizer):
    with LiveProxy(backend.address, tokenizer=str(chat_tokenizer)) as p:
        yield p.client()


def texts(out, chat=False) -> list[str]:
    assert [c.index for c in out.choices] == list(range(len(out.choices)))
    return [c.message.content if chat else c.text for c in out.choices]


def streamed(chunks, chat=False) -> tuple[dict[int, str], dict[int, str], object]:
    """Text and finish reason per choice index, and the usage chunk's usage."""
    text, reasons, usage = {}, {}, None
    for c in chunks:
        if not c.choices:
            usage = c.usage
        for ch in c.choices:
            piece = ch.delta.content if chat else ch.text
            text[ch.index] = text.get(ch.index, "") + (piece or "")
            if ch.finish_reason is not None:
                assert ch.index not in reasons, "one finish per choice"
                reasons[ch.index] = ch.finish_reason
    return text, reasons, usage


def test_completions_n_equals_single_requests_with_derived_seeds(client, model):
    out = client.completions.create(model=model, prompt=PROMPT, n=3, seed=SEED, **SAMPLED)
    singles = [client.completions.create(model=model, prompt=PROMPT, seed=SEED + i, **SAMPLED) for i in range(3)]
    assert texts(out) == [s.choices[0].text for s in singles]
    assert [c.finish_reason for c in out.choices] == [s.choices[0].finish_reason for s in singles]
    assert len(set(texts(out))) > 1
    assert out.usage.prompt_tokens == singles[0].usage.prompt_tokens  # the prompt, counted once
    assert out.usage.completion_tokens == sum(s.usage.completion_tokens for s in singles)
    text, reasons, usage = streamed(client.completions.create(model=model, prompt=PROMPT, n=3, seed=SEED, stream=True,
                                                              stream_options={"include_usage": True}, **SAMPLED))
    assert [text[i] for i in range(3)] == texts(out) and sorted(reasons) == [0, 1, 2]
    assert (usage.prompt_tokens, usage.completion_tokens) == (out.usage.prompt_tokens, out.usage.completion_tokens)


def test_chat_n_equals_single_requests_with_derived_seeds(chat_client, model):
    out = chat_client.chat.completions.create(model=model, messages=MESSAGES, n=3, seed=SEED, **SAMPLED)
    singles = [chat_client.chat.completions.create(model=model, messages=MESSAGES, seed=SEED + i, **SAMPLED)
               for i in range(3)]
    assert texts(out, chat=True) == [s.choices[0].message.content for s in singles]
    assert out.usage.completion_tokens == sum(s.usage.completion_tokens for s in singles)
    chunks = list(chat_client.chat.completions.create(model=model, messages=MESSAGES, n=3, seed=SEED, stream=True,
                                                      **SAMPLED))
    roles = [ch.index for c in chunks for ch in c.choices if ch.delta.role == "assistant"]
    assert roles == [0, 1, 2]
    text, reasons, _ = streamed(chunks, chat=True)
    assert [text[i] for i in range(3)] == texts(out, chat=True) and sorted(reasons) == [0, 1, 2]


def test_greedy_n_gives_identical_choices(client, model):
    out = client.completions.create(model=model, prompt=PROMPT, n=2, temperature=0, max_tokens=8)
    assert texts(out)[0] == texts(out)[1] == client.completions.create(
        model=model, prompt=PROMPT, temperature=0, max_tokens=8).choices[0].text


def test_a_prompt_batch_gives_one_choice_per_prompt(backend, client, model):
    prompts = [PROMPT, backend.tokenizer.encode("import os\n"), "for i in range(10):"]
    out = client.completions.create(model=model, prompt=prompts, seed=SEED, **SAMPLED)
    singles = [client.completions.create(model=model, prompt=p, seed=SEED, **SAMPLED) for p in prompts]
    assert texts(out) == [s.choices[0].text for s in singles]
    assert out.usage.prompt_tokens == sum(s.usage.prompt_tokens for s in singles)
    assert out.usage.completion_tokens == sum(s.usage.completion_tokens for s in singles)
    text, reasons, usage = streamed(client.completions.create(model=model, prompt=prompts, seed=SEED, stream=True,
                                                              stream_options={"include_usage": True}, **SAMPLED))
    assert [text[i] for i in range(3)] == texts(out) and sorted(reasons) == [0, 1, 2]
    assert usage.completion_tokens == out.usage.completion_tokens
    # with n: prompt p's sample i is choice p * n + i
    both = client.completions.create(model=model, prompt=prompts[:2], n=2, seed=SEED, **SAMPLED)
    want = [client.completions.create(model=model, prompt=p, seed=SEED + i, **SAMPLED).choices[0].text
            for p in prompts[:2] for i in range(2)]
    assert texts(both) == want
    text, _, _ = streamed(client.completions.create(model=model, prompt=prompts[:2], n=2, seed=SEED, stream=True,
                                                    **SAMPLED))
    assert [text[k] for k in range(4)] == want
    backend.wait_idle()


@pytest.mark.parametrize(("edit", "param", "words"), [
    ({"n": 17}, "n", "n must be in [1, 16] (choices per prompt), got 17"),
    ({"n": 0}, "n", "n must be in [1, 16] (choices per prompt), got 0"),
    ({"prompt": ["x"] * 65}, "prompt", "prompt is a batch of 65 prompts; at most 64"),
    ({"prompt": ["x"] * 20, "n": 16}, "prompt",
     "prompt is a batch of 20 prompts of n = 16 choices each, 320 choices; at most 256 per request"),
    ({"prompt": ["x", [3, -1]]}, "prompt", "prompt[1][1] = -1 is not a token id (ids are in [0, vocabulary size))"),
], ids=["n 17", "n 0", "65 prompts", "320 choices", "bad token in a batch"])
def test_bad_n_and_oversized_batches_are_400(proxy, model, edit, param, words):
    for stream in (False, True):
        r = proxy.post("/v1/completions", {"model": model, "prompt": "x", "max_tokens": 4, "stream": stream, **edit})
        assert r.status_code == 400, r.text
        assert (r.json()["error"]["param"], r.json()["error"]["message"]) == (param, words)
    r = proxy.post("/v1/chat/completions", {"model": model, "messages": MESSAGES, "n": 17})
    assert r.status_code == 400 and r.json()["error"]["param"] == "n"


def test_the_servers_token_bound_names_n(tiny_folders, model):
    small = ServiceConfig(target_name="t", draft_name="d", max_request_tokens=100)
    with text_server(tiny_folders, config=small) as server, LiveProxy(server.address) as p:
        body = {"model": "t", "prompt": "x", "n": 4, "max_tokens": 26}
        for stream in (False, True):
            r = p.post("/v1/completions", {**body, "stream": stream})
            assert r.status_code == 400 and r.json()["error"]["param"] == "n", r.text
            assert "at most 100 new tokens over its samples" in r.json()["error"]["message"]
        server.wait_idle()
