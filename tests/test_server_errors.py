"""Bad input is INVALID_ARGUMENT naming the field; speculation without a draft model is refused; a
full queue is RESOURCE_EXHAUSTED; a request that fails in the engine fails alone with INTERNAL."""

from __future__ import annotations

import grpc
import pytest

from hedgerow.drafting.spec import SpecMode
from hedgerow.server.rpc import generation_pb2 as pb
from tests import server_common
from tests.live import LiveServer, req
from tests.server_common import SLOW
from tests.tiny import PROMPTS, make_engine, nudged_engine, tiny_model

references = server_common.references  # a fixture, shared with the other server tests
server = server_common.server  # a fixture, shared with the other server tests


# --- bad input, overload, failures ---------------------------------------------------------------
def _with(msg: pb.GenerateRequest, edit) -> pb.GenerateRequest:
    edit(msg)
    return msg


def _set(path: str, value):
    def edit(msg):
        *parents, leaf = path.split(".")
        target = msg
        for p in parents:
            target = getattr(target, p)
        if isinstance(value, list):
            del getattr(target, leaf)[:]
            getattr(target, leaf).extend(value)
        else:
            setattr(target, leaf, value)
    return edit


BAD = {
    "no prompt": (pb.GenerateRequest(), "prompt"),
    "both prompts": (_with(req([5, 6]), _set("prompt", "hello")), "prompt_token_ids"),
    "empty prompt": (req(""), "prompt"),
    "token outside the vocabulary": (req([5, 128]), "prompt_token_ids[1]"),
    "huge token id": (req([2**32 - 1]), "prompt_token_ids[0]"),
    "prompt longer than the context": (req(list(range(2, 102)) * 3), "prompt_token_ids"),
    "negative temperature": (req([5], temperature=-0.5), "sampling.temperature"),
    "NaN temperature": (req([5], temperature=float("nan")), "sampling.temperature"),
    "infinite temperature": (req([5], temperature=float("inf")), "sampling.temperature"),
    "top_p zero": (req([5], temperature=1.0, top_p=0.0), "sampling.top_p"),
    "top_p above one": (req([5], top_p=1.5), "sampling.top_p"),
    "top_p NaN": (req([5], top_p=float("nan")), "sampling.top_p"),
    "negative top_k": (req([5], top_k=-1), "sampling.top_k"),
    "negative seed": (req([5], seed=-7), "sampling.seed"),
    "max_new_tokens zero": (req([5], 0), "stopping.max_new_tokens"),
    "max_new_tokens negative": (req([5], -3), "stopping.max_new_tokens"),
    "max_new_tokens beyond the context": (req([5], 100_000), "stopping.max_new_tokens"),
    "empty stop string": (req([5], stop=["ok", ""]), "stopping.stop[1]"),
    "too many stop strings": (req([5], stop=[f"s{i}" for i in range(17)]), "stopping.stop"),
    "stop string too long": (req([5], stop=["x" * 300]), "stopping.stop[0]"),
    "unknown speculation mode": (_with(req([5]), _set("speculation.mode", 9)), "speculation.mode"),
    "negative draft_tokens": (_with(req([5]), _set("speculation.draft_tokens", -1)), "speculation.draft_tokens"),
    "huge draft_tokens": (_with(req([5]), _set("speculation.draft_tokens", 10_000)), "speculation.draft_tokens"),
    "negative tree_budget": (_with(req([5]), _set("speculation.tree_budget", -2)), "speculation.tree_budget"),
    "huge tree_budget": (_with(req([5]), _set("speculation.tree_budget", 1 << 30)), "speculation.tree_budget"),
    "request_id too long": (req([5], rid="r" * 1000), "request_id"),
}


@pytest.mark.live
@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_invalid_argument_naming_the_field(server, case):
    msg, field = BAD[case]
    for call in (server.stub.Generate, lambda m, **kw: list(server.stub.GenerateStream(m, **kw))):
        with pytest.raises(grpc.RpcError) as err:
            call(msg, timeout=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
        assert field in err.value.details(), err.value.details()
    assert server.serving()


@pytest.mark.live
def test_the_model_proposer_needs_a_draft_model(tiny_tokenizer, references):
    """A server without a draft refuses what needs one (proposer model, or hybrid); a plain
    request drafts nothing (an unset proposer there means ngram: tests/test_proposers_live.py)."""
    with LiveServer(make_engine(tiny_model("llama", seed=0), None, mode=SpecMode.PLAIN), tiny_tokenizer) as h:
        for proposer in (pb.PROPOSER_MODEL, pb.PROPOSER_HYBRID):
            msg = req(PROMPTS[1], mode=pb.SPECULATION_MODE_CHAIN)
            msg.speculation.proposer = proposer
            with pytest.raises(grpc.RpcError) as err:
                h.stub.Generate(msg, timeout=30)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, proposer
            assert "needs a draft model" in err.value.details(), err.value.details()
        plain = h.stub.Generate(req(PROMPTS[1]), timeout=60)
        assert list(plain.token_ids) == references[1] and plain.stats.draft_tokens == 0
        # plain decoding drafts nothing, so no speculative step is counted
        assert h.sample("hedgerow_spec_verify_steps_total") == 0 and h.sample("hedgerow_spec_draft_tokens_total") == 0
        assert h.sample("hedgerow_generated_tokens_total") == len(references[1])
        assert h.serving()


@pytest.mark.live
def test_a_full_queue_is_resource_exhausted(tiny_tokenizer, references):
    with LiveServer(nudged_engine(slots=1, max_waiting=1), tiny_tokenizer, delay=SLOW) as h:
        futures = [h.stub.Generate.future(req(PROMPTS[1]), timeout=120) for _ in range(6)]
        codes, outputs = [], []
        for f in futures:
            try:
                outputs.append(list(f.result().token_ids))
                codes.append(grpc.StatusCode.OK)
            except grpc.RpcError as exc:
                codes.append(exc.code())
                assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, exc.details()
                assert "queue is full" in exc.details()
        assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) >= 1 and codes.count(grpc.StatusCode.OK) >= 1
        assert outputs == [references[1]] * len(outputs)
        assert h.sample("hedgerow_requests_total", status="resource_exhausted") == len(futures) - len(outputs)
        assert h.serving()


@pytest.mark.live
def test_a_failing_request_fails_alone_with_internal(tiny_tokenizer, references):
    engine = nudged_engine()
    forward = engine.target.forward
    poison = [126, 127, 126, 127]

    def poisoned(slots, flat):
        for row in flat.tokens.tolist():
            if any(row[i:i + 4] == poison for i in range(len(row) - 3)):
                raise RuntimeError("poisoned prompt")
        return forward(slots, flat)

    engine.target.forward = poisoned
    with LiveServer(engine, tiny_tokenizer) as h:
        bad = h.stub.Generate.future(req(poison + [5, 6]), timeout=60)
        good = [h.stub.Generate.future(req(p), timeout=60) for p in PROMPTS]
        with pytest.raises(grpc.RpcError) as err:
            bad.result()
        # the client learns which request failed; the reason, a Python exception, is for the log only
        assert err.value.code() == grpc.StatusCode.INTERNAL and "failed in the engine" in err.value.details()
        assert "RuntimeError" not in err.value.details() and "poisoned" not in err.value.details()
        assert [list(f.result().token_ids) for f in good] == references
        assert h.sample("hedgerow_requests_total", status="error") == 1
        h.wait_idle()
        assert h.serving()
