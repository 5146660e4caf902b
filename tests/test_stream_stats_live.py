"""Per-step speculation stats on the wire, and vLLM's stopping extensions.

- every GenerateStreamResponse carries its engine step's stats (drafted, accepted, by proposer, the
  budgets the policy chose), and a stream's steps add up to its final stats; the OpenAI stream does
  the same in each chunk's ``hedgerow`` object when ``hedgerow.step_stats`` asks for it;
- ``usage.completion_tokens_details`` counts the accepted draft tokens;
- ``stop_token_ids`` end a request after the token, ``min_tokens`` masks EOS and stop tokens until
  then (speculative output equal to plain decoding's under the same mask), over gRPC and the proxy.
"""

from __future__ import annotations

import json
from collections import Counter

import grpc
import pytest

from hedgerow.server.rpc import generation_pb2 as pb
from hedgerow.server.service.grpc_service import ServiceConfig
from tests.live import LiveProxy, LiveServer, req
from tests.tiny import EOS, PROMPTS, hf_greedy, nudged_engine, tiny_model

N = 24
EOS_PROMPT = PROMPTS[0]  # the llama target's (seed 0) greedy output ends with EOS after 10 tokens
NAMES = {pb.PROPOSER_MODEL: "model", pb.PROPOSER_NGRAM: "ngram"}


@pytest.fixture(scope="module")
def references():
    target = tiny_model("llama", seed=0)
    return [hf_greedy(target, p, N) for p in PROMPTS]


@pytest.fixture(scope="module")
def server(tiny_tokenizer):
    with LiveServer(nudged_engine(), tiny_tokenizer, config=ServiceConfig(target_name="tiny")) as s:
        yield s


@pytest.fixture(scope="module")
def proxy(server):
    with LiveProxy(server.address) as p:
        yield p


def proposer_totals(entries) -> Counter:
    out = Counter()
    for p in entries:
        out[NAMES[p.proposer], "draft"] += p.draft_tokens
        out[NAMES[p.proposer], "accepted"] += p.accepted_tokens
    return out


@pytest.mark.live
@pytest.mark.parametrize("mode", [pb.SPECULATION_MODE_CHAIN, pb.SPECULATION_MODE_TREE, pb.SPECULATION_MODE_PLAIN])
def test_a_streams_per_step_stats_sum_to_its_final_stats(server, references, mode):
    for prompt, ref in zip(PROMPTS, references):
        msgs = list(server.stub.GenerateStream(req(prompt, N, mode=mode), timeout=120))
        assert [t for m in msgs for t in m.token_ids] == ref
        assert all(m.HasField("step") for m in msgs)
        final = msgs[-1].stats
        steps = [m.step for m in msgs]
        assert len(steps) == final.verify_steps
        assert sum(s.draft_tokens for s in steps) == final.draft_tokens
        assert sum(s.accepted_tokens for s in steps) == final.accepted_tokens
        assert sum((proposer_totals(s.proposers) for s in steps), Counter()) == proposer_totals(final.proposers)
        for s in steps:
            assert s.accepted_tokens <= s.draft_tokens
            assert sum(p.draft_tokens for p in s.proposers) == s.draft_tokens
            if mode == pb.SPECULATION_MODE_PLAIN:
                assert s.draft_tokens == s.draft_budget == s.ngram_budget == 0
            elif mode == pb.SPECULATION_MODE_CHAIN:  # adaptive none: the configured 4, within the room
                assert s.draft_budget <= 4 and s.draft_budget == proposer_totals(s.proposers)["model", "draft"]
        if mode != pb.SPECULATION_MODE_PLAIN:
            assert final.draft_tokens > 0 and steps[0].draft_budget > 0


@pytest.mark.live
def test_the_openai_stream_carries_step_stats_when_asked(proxy):
    body = {"model": "tiny", "prompt": PROMPTS[1], "max_tokens": N, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, "hedgerow": {"step_stats": True}}
    path = "/v1/completions"
    r = proxy.post(path, body)
    assert r.status_code == 200, r.text
    events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
    steps = [e["hedgerow"]["step"] for e in events if "step" in e.get("hedgerow", {})]
    (final,) = [e["hedgerow"] for e in events if e.get("hedgerow") and "step" not in e["hedgerow"]]
    usage = events[-1]["usage"]
    assert len(steps) == final["verify_steps"] and final["draft_tokens"] > 0
    assert sum(s["draft_tokens"] for s in steps) == final["draft_tokens"]
    assert sum(s["accepted_tokens"] for s in steps) == final["accepted_tokens"]
    for name, counts in final["proposers"].items():
        assert sum(s["proposers"].get(name, {}).get("accepted_tokens", 0) for s in steps) == counts["accepted_tokens"]
    assert usage["completion_tokens_details"] == {
        "accepted_prediction_tokens": final["accepted_tokens"],
        "rejected_prediction_tokens": final["draft_tokens"] - final["accepted_tokens"]}
    plain = proxy.post(path, {**body, "hedgerow": {}})  # not asked: no step stats
    assert not any("step" in (json.loads(line[6:]).get("hedgerow") or {}) for line in plain.text.splitlines()
                   if line.startswith("data: {"))
    refused = proxy.post(path, {**body, "stream": False, "stream_options": None})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "hedgerow.step_stats"


@pytest.mark.live
def test_usage_counts_accepted_draft_tokens(proxy):
    out = proxy.client().completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=N, temperature=0)
    stats = out.model_extra["hedgerow"]
    details = out.usage.completion_tokens_details
    assert details.accepted_prediction_tokens == stats["accepted_tokens"] > 0
    assert details.rejected_prediction_tokens == stats["draft_tokens"] - stats["accepted_tokens"]


@pytest.mark.live
def test_stop_token_ids_end_the_request_after_the_token(server, proxy, references):
    ref = references[1]
    k = next(i for i in range(3, len(ref)) if ref[i] not in ref[:i])  # a token first seen at position k
    for mode in (pb.SPECULATION_MODE_CHAIN, pb.SPECULATION_MODE_TREE, pb.SPECULATION_MODE_PLAIN):
        msg = req(PROMPTS[1], N, mode=mode)
        msg.stopping.stop_token_ids.append(ref[k])
        out = server.stub.Generate(msg, timeout=60)
        assert list(out.token_ids) == ref[: k + 1] and out.finish_reason == pb.FINISH_REASON_STOP
    out = proxy.client().completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=N, temperature=0,
                                            extra_body={"stop_token_ids": [ref[k]]})
    assert out.choices[0].finish_reason == "stop" and out.usage.completion_tokens == k + 1
    r = proxy.post("/v1/completions", {"model": "tiny", "prompt": PROMPTS[1], "stop_token_ids": [10**6]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "stop_token_ids", r.text
    msg = req(PROMPTS[1], N)
    msg.stopping.stop_token_ids.extend(range(65))
    with pytest.raises(grpc.RpcError) as err:
        server.stub.Generate(msg, timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details() == "stopping.stop_token_ids has 65 ids; at most 64"


@pytest.mark.live
def test_min_tokens_masks_eos_until_then_in_every_mode(server, proxy, references):
    ref = references[0]
    assert ref[-1] == EOS and len(ref) == 10
    outs = {}
    for mode in (pb.SPECULATION_MODE_PLAIN, pb.SPECULATION_MODE_CHAIN, pb.SPECULATION_MODE_TREE):
        msg = req(EOS_PROMPT, N, mode=mode)
        msg.stopping.min_tokens = 16
        outs[mode] = list(server.stub.Generate(msg, timeout=60).token_ids)
    plain = outs[pb.SPECULATION_MODE_PLAIN]
    assert plain[:9] == ref[:9] and EOS not in plain[:16] and len(plain) >= 16
    assert outs[pb.SPECULATION_MODE_CHAIN] == outs[pb.SPECULATION_MODE_TREE] == plain
    out = proxy.client().completions.create(model="tiny", prompt=EOS_PROMPT, max_tokens=N, temperature=0,
                                            extra_body={"min_tokens": 16})
    assert out.usage.completion_tokens == len(plain)
    r = proxy.post("/v1/completions", {"model": "tiny", "prompt": EOS_PROMPT, "max_tokens": 4, "min_tokens": 5})
    assert r.status_code == 400 and r.json()["error"]["param"] == "min_tokens", r.text
