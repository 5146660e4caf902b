"""n samples over gRPC (conftest's ``backend``: the tiny folder pair): sample i of a request seeded s is
exactly the single request seeded (s + i) mod 2^63, unary (``samples``, sample 0 also at the top level)
and streamed (messages marked by ``index``); greedy samples are identical; n and n * max_new_tokens
are bounded, refused with INVALID_ARGUMENT naming n."""

from __future__ import annotations

import grpc
import pytest

from hedgerow.server.rpc import generation_pb2 as pb
from hedgerow.server.service.requests import ServiceConfig
from tests.live import text_server

pytestmark = pytest.mark.live

PROMPT = "def fibonacci(n):"
N = 16


def request(n: int, *, new: int = N, mode=pb.SPECULATION_MODE_CHAIN, **sampling) -> pb.GenerateRequest:
    msg = pb.GenerateRequest(request_id="many", prompt=PROMPT, n=n, stopping=pb.StoppingCriteria(max_new_tokens=new),
                             logprobs=True, top_logprobs=1)
    msg.speculation.mode = mode
    for name, value in sampling.items():
        setattr(msg.sampling, name, value)
    return msg


def single(backend, msg: pb.GenerateRequest, seed: int | None) -> pb.GenerateResponse:
    one = pb.GenerateRequest()
    one.CopyFrom(msg)
    one.n, one.request_id = 1, ""
    if seed is not None:
        one.sampling.seed = seed
    return backend.stub.Generate(one, timeout=60)


def same(a, b) -> bool:
    return (a.text, list(a.token_ids), a.finish_reason, a.usage.completion_tokens) == \
        (b.text, list(b.token_ids), b.finish_reason, b.usage.completion_tokens) and \
        [e.token_id for e in a.logprobs] == [e.token_id for e in b.logprobs]


@pytest.mark.parametrize("mode", [pb.SPECULATION_MODE_CHAIN, pb.SPECULATION_MODE_TREE])
def test_seeded_samples_equal_single_requests_with_the_derived_seeds(backend, mode):
    msg = request(3, mode=mode, temperature=0.9, seed=2**63 - 2)  # the seeds wrap: s, s + 1, 0
    out = backend.stub.Generate(msg, timeout=60)
    assert [s.index for s in out.samples] == [0, 1, 2]
    assert all(s.request_id == "many" and not s.samples for s in out.samples)
    assert same(out, out.samples[0]) and out.index == 0
    for i, seed in enumerate([2**63 - 2, 2**63 - 1, 0]):
        assert same(out.samples[i], single(backend, msg, seed)), f"sample {i}"
    assert len({s.text for s in out.samples}) > 1
    streamed = list(backend.stub.GenerateStream(msg, timeout=60))
    assert {m.request_id for m in streamed} == {"many"}
    for i, sample in enumerate(out.samples):
        mine = [m for m in streamed if m.index == i]
        assert "".join(m.text for m in mine) == sample.text
        assert [t for m in mine for t in m.token_ids] == list(sample.token_ids)
        assert [m.finish_reason != pb.FINISH_REASON_UNSPECIFIED for m in mine] == [False] * (len(mine) - 1) + [True]
        assert mine[-1].usage == sample.usage and mine[-1].stats == sample.stats


def test_greedy_samples_are_identical_and_n_1_is_unchanged(backend):
    out = backend.stub.Generate(request(2), timeout=60)
    assert len(out.samples) == 2 and same(out.samples[0], out.samples[1])
    one = backend.stub.Generate(request(1), timeout=60)
    assert not one.samples and same(one, out.samples[0])
    assert same(backend.stub.Generate(request(0), timeout=60), one)  # 0 (absent) is 1


def test_n_is_bounded(backend, tiny_folders):
    with pytest.raises(grpc.RpcError) as err:
        backend.stub.Generate(request(17), timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details() == "n must be in [1, 16] (samples of the prompt), got 17"
    small = ServiceConfig(target_name="t", draft_name="d", max_request_tokens=100)
    with text_server(tiny_folders, config=small) as server:
        assert len(server.stub.Generate(request(4, new=25), timeout=60).samples) == 4
        with pytest.raises(grpc.RpcError) as err:
            server.stub.Generate(request(4, new=26), timeout=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert err.value.details() == ("n = 4 samples of up to 26 new tokens each is 104; a request may ask for at "
                                       "most 100 new tokens over its samples")
        server.wait_idle()
