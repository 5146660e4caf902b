"""Proposers on the wire: a server without a draft model serves n-gram speculation over gRPC with
the target's own greedy output; a request picks its proposer and n-gram sizes over gRPC and through
the OpenAI proxy's ``hedgerow`` extension; the per-proposer counts of the final stats add up to the
totals and to the ``proposer``-labelled Prometheus counters; bad values are refused naming the field.

The target falls into loops on some prompts (tests/test_proposers.py's seeds), so that lookup finds
continuations the target accepts."""

from __future__ import annotations

import grpc
import pytest

from hedgerow.server.rpc import generation_pb2 as pb
from hedgerow.server.service.grpc_service import ServiceConfig
from tests.live import LiveProxy, LiveServer, req
from tests.tiny import PROMPTS, hf_greedy, make_engine, tiny_model

N = 40
LOOPING = 2  # tests/test_proposers.py LOOPING_SEED["llama"]
NAMES = {pb.PROPOSER_MODEL: "model", pb.PROPOSER_NGRAM: "ngram"}


def pair():
    return tiny_model("llama", seed=LOOPING), tiny_model("llama", seed=1, layers=1, hidden=32)


@pytest.fixture(scope="module")
def references():
    target, _ = pair()
    return [hf_greedy(target, p, N) for p in PROMPTS]


@pytest.fixture(scope="module")
def draftless(tiny_tokenizer):
    target, _ = pair()
    with LiveServer(make_engine(target, None), tiny_tokenizer, config=ServiceConfig(target_name="tiny")) as s:
        yield s


@pytest.fixture(scope="module")
def hybrid(tiny_tokenizer):
    with LiveServer(make_engine(*pair()), tiny_tokenizer, config=ServiceConfig(target_name="tiny")) as s:
        yield s


@pytest.fixture(scope="module")
def hybrid_proxy(hybrid):
    with LiveProxy(hybrid.address) as p:
        yield p


def spec_req(prompt, proposer=None, mode=pb.SPECULATION_MODE_CHAIN, **sizes) -> pb.GenerateRequest:
    msg = req(prompt, N, mode=mode)
    if proposer is not None:
        msg.speculation.proposer = proposer
    for name, value in sizes.items():
        setattr(msg.speculation, name, value)
    return msg


def by_proposer(stats) -> dict[str, tuple[int, int]]:
    return {NAMES[p.proposer]: (p.draft_tokens, p.accepted_tokens) for p in stats.proposers}


def assert_adds_up(stats) -> None:
    counts = by_proposer(stats).values()
    assert sum(d for d, _ in counts) == stats.draft_tokens and sum(a for _, a in counts) == stats.accepted_tokens


@pytest.mark.live
def test_a_server_without_a_draft_model_serves_ngram_with_plain_greedy_output(draftless, references):
    info = draftless.stub.ModelInfo(pb.ModelInfoRequest(), timeout=10)
    assert info.draft == "" and info.default_speculation.proposer == pb.PROPOSER_NGRAM
    assert (info.default_speculation.ngram_max, info.default_speculation.ngram_min) == (4, 2)
    outs = []
    for mode in (pb.SPECULATION_MODE_CHAIN, pb.SPECULATION_MODE_TREE):
        for proposer in (None, pb.PROPOSER_NGRAM):  # the server's default is ngram
            futures = [draftless.stub.Generate.future(spec_req(p, proposer, mode), timeout=120) for p in PROMPTS]
            outs += [f.result() for f in futures]
            assert [list(o.token_ids) for o in outs[-len(PROMPTS):]] == references
    stream = list(draftless.stub.GenerateStream(spec_req(PROMPTS[1], pb.PROPOSER_NGRAM), timeout=120))
    assert [t for m in stream for t in m.token_ids] == references[1]
    plain = [draftless.stub.Generate(req(p, N, mode=pb.SPECULATION_MODE_PLAIN), timeout=120) for p in PROMPTS]
    assert [list(o.token_ids) for o in plain] == references
    assert sum(o.stats.accepted_tokens for o in outs) > 0
    for o in outs:
        assert set(by_proposer(o.stats)) <= {"ngram"}
        assert_adds_up(o.stats)
    for proposer, name in ((pb.PROPOSER_MODEL, "model"), (pb.PROPOSER_HYBRID, "hybrid")):
        with pytest.raises(grpc.RpcError) as err:
            draftless.stub.Generate(spec_req(PROMPTS[0], proposer), timeout=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert f"proposer {name} needs a draft model; this server has none" in err.value.details()


@pytest.mark.live
def test_a_request_picks_its_proposer_over_grpc(hybrid, references):
    info = hybrid.stub.ModelInfo(pb.ModelInfoRequest(), timeout=10)
    assert info.default_speculation.proposer == pb.PROPOSER_HYBRID
    counters = ("hedgerow_spec_draft_tokens_total", "hedgerow_spec_accepted_tokens_total")
    before = {(c, n): hybrid.sample(c, proposer=n) for c in counters for n in ("model", "ngram")}
    seen = {}
    for proposer in (pb.PROPOSER_MODEL, pb.PROPOSER_NGRAM, pb.PROPOSER_HYBRID, None):
        for mode in (pb.SPECULATION_MODE_CHAIN, pb.SPECULATION_MODE_TREE):
            outs = [f.result() for f in [hybrid.stub.Generate.future(spec_req(p, proposer, mode), timeout=120)
                                         for p in PROMPTS]]
            assert [list(o.token_ids) for o in outs] == references, (proposer, mode)
            for o in outs:
                assert_adds_up(o.stats)
            seen[proposer, mode] = {k for o in outs for k in by_proposer(o.stats)}
    for mode in (pb.SPECULATION_MODE_CHAIN, pb.SPECULATION_MODE_TREE):
        assert seen[pb.PROPOSER_MODEL, mode] == {"model"} and seen[pb.PROPOSER_NGRAM, mode] == {"ngram"}
        assert seen[pb.PROPOSER_HYBRID, mode] == seen[None, mode] == {"model", "ngram"}
    # the n-gram sizes ride along: a longest match of 1 token still copies, and still keeps the output
    one = hybrid.stub.Generate(spec_req(PROMPTS[1], pb.PROPOSER_NGRAM, ngram_max=1, ngram_min=1), timeout=120)
    assert list(one.token_ids) == references[1] and one.stats.accepted_tokens > 0
    after = {(c, n): hybrid.sample(c, proposer=n) for c in counters for n in ("model", "ngram")}
    for key in [(c, "model") for c in counters[:1]] + [(c, "ngram") for c in counters]:  # the random draft accepts little
        assert after[key] > before[key], key
    for c in counters:
        assert hybrid.sample(c) == sum(hybrid.sample(c, proposer=n) for n in ("model", "ngram"))


@pytest.mark.live
@pytest.mark.parametrize(("field", "value", "words"), [
    ("proposer", 9, "speculation.proposer 9 is not a Proposer"),
    ("ngram_max", 17, "speculation.ngram_max must be in [1, 16], got 17"),
    ("ngram_min", 0, "speculation.ngram_min must be in [1, 16], got 0"),
])
def test_bad_proposer_settings_are_invalid_argument_naming_the_field(hybrid, field, value, words):
    msg = spec_req(PROMPTS[0])
    setattr(msg.speculation, field, value)
    with pytest.raises(grpc.RpcError) as err:
        hybrid.stub.Generate(msg, timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and err.value.details().startswith(words)


@pytest.mark.live
def test_a_request_picks_its_proposer_through_the_proxy(hybrid_proxy, references):
    client = hybrid_proxy.client()
    card = client.models.list().data[0].model_dump()["hedgerow"]["default_speculation"]
    assert card["proposer"] == "hybrid" and (card["ngram_max"], card["ngram_min"]) == (4, 2)
    for proposer, names in (("model", {"model"}), ("ngram", {"ngram"}), ("hybrid", {"model", "ngram"})):
        speculation = {"mode": "chain", "proposer": proposer, "ngram_max": 3, "ngram_min": 2}
        found = set()
        for prompt, ref in zip(PROMPTS, references):
            out = client.completions.create(model="tiny", prompt=prompt, max_tokens=N, temperature=0,
                                            extra_body={"hedgerow": {"speculation": speculation}})
            stats = out.model_extra["hedgerow"]
            assert sum(p["draft_tokens"] for p in stats["proposers"].values()) == stats["draft_tokens"]
            assert sum(p["accepted_tokens"] for p in stats["proposers"].values()) == stats["accepted_tokens"]
            found |= set(stats["proposers"])
            # the text is the reference's, decoded; the tokens are checked over gRPC above
            assert out.choices[0].finish_reason in ("stop", "length")
        assert found == names, proposer
    for field, value, words in (("proposer", "copy", "hedgerow.speculation.proposer must be one of model, ngram, "
                                                     "hybrid, got 'copy'"),
                                ("ngram_max", 0, "hedgerow.speculation.ngram_max must be in [1, 16], got 0")):
        r = hybrid_proxy.post("/v1/completions", {"model": "tiny", "prompt": [5, 6], "max_tokens": 4,
                                                  "hedgerow": {"speculation": {field: value}}})
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["param"] == f"hedgerow.speculation.{field}" and err["message"].startswith(words), err
