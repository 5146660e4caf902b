"""The server's Prometheus metrics: counters follow the traffic and agree with the responses,
nothing after EOS is counted, and the endpoint serves every metric."""

from __future__ import annotations

import re
import urllib.request

import pytest

from hedgerow.server.rpc import generation_pb2 as pb
from tests import server_common
from tests.live import LiveServer, req
from tests.tiny import EOS, PROMPTS, hf_greedy, make_engine, nudged_engine, tiny_model

references = server_common.references  # a fixture, shared with the other server tests
server = server_common.server  # a fixture, shared with the other server tests


EOS_PROMPT = PROMPTS[0]  # the target's greedy output for it ends with EOS after 10 tokens


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
