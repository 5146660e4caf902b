"""The OpenAI-compatible proxy's answers, live (conftest's ``backend``, ``proxy``, ``client``, ``model``).

Checked against references: the proxy's text is the gRPC server's own; streamed text equals unary
text under greedy; speculation settings leave greedy output unchanged; chat output is the completion
of the rendered chat template.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from hedgerow.server.rpc import generation_pb2 as pb
from tests.live import TEXT_PROMPTS, LiveProxy

openai = pytest.importorskip("openai", reason="the proxy tests drive the official client: pip install openai")
pytestmark = pytest.mark.live

def grpc_text(backend, prompt, n) -> pb.GenerateResponse:
    msg = pb.GenerateRequest(stopping=pb.StoppingCriteria(max_new_tokens=n))
    if isinstance(prompt, str):
        msg.prompt = prompt
    else:
        msg.prompt_token_ids.extend(prompt)
    return backend.stub.Generate(msg, timeout=60)


def stream_text(chunks) -> tuple[str, list]:
    chunks = list(chunks)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    return text, chunks


# --- models --------------------------------------------------------------------------------------
def test_models_lists_the_served_model(client, model, tiny_folders):
    models = client.models.list().data
    assert [m.id for m in models] == [model] == [str(tiny_folders["target"])]
    card = models[0].model_dump()
    assert card["owned_by"] == "hedgerow"
    assert card["hedgerow"]["max_model_len"] == 128 and card["hedgerow"]["draft"] == str(tiny_folders["draft"])
    assert card["hedgerow"]["default_speculation"] == {"mode": "chain", "proposer": "hybrid", "draft_tokens": 3,
                                                       "tree_budget": 16, "ngram_max": 4, "ngram_min": 2}
    assert client.models.retrieve(model).id == model
    with pytest.raises(openai.NotFoundError) as err:
        client.models.retrieve("gpt-4o")
    assert err.value.body["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4o", prompt="x", max_tokens=2)


# --- completions ---------------------------------------------------------------------------------
def test_completions_unary_and_stream_are_the_servers_greedy_output(backend, client, model):
    for prompt in TEXT_PROMPTS:
        ref = grpc_text(backend, prompt, 24)
        unary = client.completions.create(model=model, prompt=prompt, max_tokens=24, temperature=0)
        choice = unary.choices[0]
        assert choice.text == ref.text and unary.model == model and unary.object == "text_completion"
        assert choice.finish_reason == ("stop" if ref.finish_reason == pb.FINISH_REASON_EOS else "length")
        assert unary.usage.prompt_tokens == ref.usage.prompt_tokens
        assert unary.usage.completion_tokens == ref.usage.completion_tokens == len(ref.token_ids)
        assert unary.usage.total_tokens == unary.usage.prompt_tokens + unary.usage.completion_tokens
        spec = unary.model_dump()["hedgerow"]
        assert spec["draft_tokens"] > 0 and 0 <= spec["accepted_tokens"] <= spec["draft_tokens"]
        assert spec["acceptance_rate"] == pytest.approx(spec["accepted_tokens"] / spec["draft_tokens"])

        text, chunks = stream_text(client.completions.create(
            model=model, prompt=prompt, max_tokens=24, temperature=0, stream=True,
            stream_options={"include_usage": True}))
        assert text == unary.choices[0].text
        assert all(c.id == chunks[0].id and c.model == model for c in chunks)
        assert [c.choices[0].finish_reason for c in chunks[:-2]] == [None] * (len(chunks) - 2)
        assert chunks[-2].choices[0].finish_reason == choice.finish_reason
        assert chunks[-2].model_dump()["hedgerow"]["draft_tokens"] > 0
        assert chunks[-1].choices == [] and chunks[-1].usage == unary.usage
        assert all(c.usage is None for c in chunks[:-1])


def test_stream_without_usage_ends_with_done(proxy, model):
    body = {"model": model, "prompt": TEXT_PROMPTS[0], "max_tokens": 8, "stream": True}
    with httpx.stream("POST", proxy.url + "/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    assert "usage" not in chunks[-1] and chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_token_id_prompts_and_batches_of_one(backend, client, model):
    ids = backend.tokenizer.encode(TEXT_PROMPTS[1])
    want = client.completions.create(model=model, prompt=TEXT_PROMPTS[1], max_tokens=12).choices[0].text
    assert client.completions.create(model=model, prompt=ids, max_tokens=12).choices[0].text == want
    assert client.completions.create(model=model, prompt=[ids], max_tokens=12).choices[0].text == want
    assert client.completions.create(model=model, prompt=[TEXT_PROMPTS[1]], max_tokens=12).choices[0].text == want


def test_stop_strings_and_finish_reasons(client, model):
    full = client.completions.create(model=model, prompt=TEXT_PROMPTS[0], max_tokens=40,
                                     extra_body={"ignore_eos": True}).choices[0]
    assert full.finish_reason == "length" and len(full.text) > 10
    stop = full.text[len(full.text) // 2: len(full.text) // 2 + 2]
    want = full.text[: full.text.find(stop)]
    for stops in (stop, ["never \x00", stop]):
        cut = client.completions.create(model=model, prompt=TEXT_PROMPTS[0], max_tokens=40, stop=stops,
                                        extra_body={"ignore_eos": True}).choices[0]
        assert (cut.text, cut.finish_reason) == (want, "stop")
        text, chunks = stream_text(client.completions.create(model=model, prompt=TEXT_PROMPTS[0], max_tokens=40,
                                                             stop=stops, stream=True, extra_body={"ignore_eos": True}))
        assert text == want and chunks[-1].choices[0].finish_reason == "stop"
    short = client.completions.create(model=model, prompt=TEXT_PROMPTS[0], max_tokens=3, extra_body={"ignore_eos": True})
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 3


def test_speculation_settings_keep_greedy_output(client, model):
    def run(speculation):
        out = client.completions.create(model=model, prompt=TEXT_PROMPTS[2], max_tokens=24,
                                        extra_body={"hedgerow": {"speculation": speculation}})
        return out.choices[0].text, out.model_dump()["hedgerow"]

    base, _ = run({})
    plain_text, plain = run({"mode": "plain"})
    assert plain_text == base and plain["draft_tokens"] == 0 and plain["acceptance_rate"] is None
    chain_text, chain = run({"mode": "chain", "draft_tokens": 1})
    assert chain_text == base and 0 < chain["draft_tokens"] <= chain["verify_steps"]
    tree_text, tree = run({"mode": "tree", "tree_budget": 8})
    assert tree_text == base and tree["draft_tokens"] > 0


def test_seeded_sampling_is_reproducible(client, model):
    kw = dict(model=model, prompt=TEXT_PROMPTS[0], max_tokens=16, temperature=0.9, top_p=0.95, seed=7,
              extra_body={"top_k": 50})
    first = client.completions.create(**kw).choices[0].text
    assert client.completions.create(**kw).choices[0].text == first
    assert stream_text(client.completions.create(stream=True, **kw))[0] == first


def test_concurrent_requests_get_their_own_output(client, model):
    want = {p: client.completions.create(model=model, prompt=p, max_tokens=16).choices[0].text for p in TEXT_PROMPTS}
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda i: client.completions.create(
            model=model, prompt=TEXT_PROMPTS[i % 3], max_tokens=16).choices[0].text, range(9)))
    assert got == [want[TEXT_PROMPTS[i % 3]] for i in range(9)]


# --- chat ----------------------------------------------------------------------------------------
def test_chat_with_a_template(backend, chat_tokenizer, model):
    with LiveProxy(backend.address, tokenizer=str(chat_tokenizer)) as p:
        client = p.client()
        messages = [{"role": "developer", "content": "Write Python."},
                    {"role": "user", "content": [{"type": "text", "text": "def "}, {"type": "text", "text": "add"}]}]
        out = client.chat.completions.create(model=model, messages=messages, max_completion_tokens=20)
        assert out.object == "chat.completion" and out.model == model
        assert out.choices[0].message.role == "assistant" and out.choices[0].finish_reason in ("stop", "length")
        # the completion of the rendered template, sent as token ids (no second BOS)
        rendered = backend.tokenizer.encode("<system>Write Python.\n<user>def add\n<assistant>")
        ref = grpc_text(backend, rendered, 20)
        assert out.choices[0].message.content == ref.text and out.usage.prompt_tokens == len(rendered)

        chunks = list(client.chat.completions.create(model=model, messages=messages, max_tokens=20, stream=True,
                                                     stream_options={"include_usage": True}))
        assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].object == "chat.completion.chunk"
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ref.text
        assert chunks[-2].choices[0].finish_reason == out.choices[0].finish_reason
        assert chunks[-1].usage == out.usage

        with pytest.raises(openai.BadRequestError) as err:  # a second, different length limit
            client.chat.completions.create(model=model, messages=messages, max_tokens=5, max_completion_tokens=6)
        assert err.value.body["param"] == "max_completion_tokens"
