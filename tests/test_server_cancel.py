"""Cancelled streams, expired deadlines and a request id in flight: each frees its KV slot at once,
and the server goes on serving."""

from __future__ import annotations

import time

import grpc
import pytest

from tests import server_common
from tests.live import req
from tests.tiny import PROMPTS

references = server_common.references  # a fixture, shared with the other server tests
slow_server = server_common.slow_server  # a fixture, shared with the other server tests


# --- cancellation, deadlines ---------------------------------------------------------------------
@pytest.mark.live
def test_cancelling_100_streams_frees_every_kv_slot(slow_server, references):
    h = slow_server
    before = {k: h.sample("hedgerow_requests_total", status=k) for k in ("cancelled", "length")}
    streams = [h.stub.GenerateStream(req(PROMPTS[i % 4], 200, ignore_eos=True), timeout=120) for i in range(100)]
    deadline = time.monotonic() + 30
    while h.engine_state() != (8, 8, 8, 92):  # all 100 in: a full batch generating, the rest waiting
        assert time.monotonic() < deadline, h.engine_state()
        time.sleep(0.01)
    for s in streams:
        s.cancel()
    h.wait_idle()
    assert h.serving()
    deadline = time.monotonic() + 20
    while sum((ended := {k: h.sample("hedgerow_requests_total", status=k) - before[k] for k in before}).values()) < 100:
        assert time.monotonic() < deadline, ended  # handlers record as they unwind
        time.sleep(0.02)
    assert ended["cancelled"] >= 92, ended  # (a request of the first batch may just have finished)
    assert h.sample("hedgerow_kv_slots_in_use", model="target") == 0
    assert h.sample("hedgerow_kv_slots_in_use", model="draft") == 0
    assert h.sample("hedgerow_running_requests") == 0 and h.sample("hedgerow_waiting_requests") == 0
    assert list(h.stub.Generate(req(PROMPTS[1]), timeout=60).token_ids) == references[1]


@pytest.mark.live
def test_an_expired_deadline_frees_the_slot(slow_server):
    stream = slow_server.stub.GenerateStream(req(PROMPTS[3], 250, ignore_eos=True), timeout=0.5)
    got = 0
    with pytest.raises(grpc.RpcError) as err:
        for msg in stream:
            got += len(msg.token_ids)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED and 0 < got < 250
    slow_server.wait_idle()
    with pytest.raises(grpc.RpcError) as err:
        slow_server.stub.Generate(req(PROMPTS[3], 250, ignore_eos=True), timeout=0.3)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    slow_server.wait_idle()
    assert slow_server.serving()


@pytest.mark.live
def test_a_request_id_in_flight_cannot_be_reused(slow_server):
    stream = slow_server.stub.GenerateStream(req(PROMPTS[0], 200, rid="twice", ignore_eos=True), timeout=60)
    assert next(stream).token_ids
    with pytest.raises(grpc.RpcError) as err:
        slow_server.stub.Generate(req(PROMPTS[1], rid="twice"), timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "request_id" in err.value.details()
    stream.cancel()
    slow_server.wait_idle()
    assert slow_server.stub.Generate(req(PROMPTS[1], 3, rid="twice"), timeout=30).usage.completion_tokens == 3
