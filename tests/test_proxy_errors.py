"""The OpenAI-compatible proxy's refusals, live (conftest's ``backend``, ``proxy``, ``client``, ``model``).

Refusals: bad parameters (400, naming the parameter), wrong key (401), server down (503, also
through ``hedgerow proxy`` as a process), deadline (504), a model without a chat template (400). A
client that goes away cancels its gRPC call and frees the KV slot.
"""

from __future__ import annotations

import signal

import grpc
import httpx
import pytest

from hedgerow.server.proxy.backend import grpc_error
from hedgerow.server.proxy.cli import listen
from tests.live import TEXT_PROMPTS, FailedCall, LiveProxy, ProxyProcess

openai = pytest.importorskip("openai", reason="the proxy tests drive the official client: pip install openai")


# --- refusals ------------------------------------------------------------------------------------
@pytest.mark.live
def test_chat_needs_a_chat_template(client, model):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}])
    assert err.value.body["code"] == "no_chat_template" and "chat template" in err.value.message


COMPLETION_BAD = {  # an edit of a valid body -> the parameter the 400 names
    "n=17": ({"n": 17}, "n"),
    "n=0": ({"n": 0}, "n"),
    "logprobs 21": ({"logprobs": 21}, "logprobs"),
    "logprobs true": ({"logprobs": True}, "logprobs"),
    "best_of": ({"best_of": 3}, "best_of"),
    "echo": ({"echo": True}, "echo"),
    "suffix": ({"suffix": "end"}, "suffix"),
    "logit_bias": ({"logit_bias": {"5": 10}}, "logit_bias"),
    "presence_penalty": ({"presence_penalty": 0.5}, "presence_penalty"),
    "frequency_penalty": ({"frequency_penalty": -1}, "frequency_penalty"),
    "temperature -1": ({"temperature": -1}, "temperature"),
    "top_p 2": ({"top_p": 2}, "top_p"),
    "top_p 0": ({"top_p": 0}, "top_p"),
    "top_k -1": ({"top_k": -1}, "top_k"),
    "seed -1": ({"seed": -1}, "seed"),
    "max_tokens 0": ({"max_tokens": 0}, "max_tokens"),
    "max_tokens beyond the context": ({"max_tokens": 10_000}, "max_tokens"),  # refused by the server
    "empty prompt": ({"prompt": ""}, "prompt"),
    "missing prompt": ({"prompt": None}, "prompt"),
    "an empty prompt in a batch": ({"prompt": ["a", ""]}, "prompt"),
    "65 prompts": ({"prompt": ["a"] * 65}, "prompt"),
    "token outside the vocabulary": ({"prompt": [5, 100_000]}, "prompt"),  # refused by the server
    "empty stop string": ({"stop": ["ok", ""]}, "stop[1]"),
    "stop of the wrong type": ({"stop": 5}, "stop"),
    "stream_options without stream": ({"stream_options": {"include_usage": True}}, "stream_options"),
    "unknown speculation mode": ({"hedgerow": {"speculation": {"mode": "warp"}}}, "hedgerow.speculation.mode"),
    "negative draft_tokens": ({"hedgerow": {"speculation": {"draft_tokens": -1}}},
                              "hedgerow.speculation.draft_tokens"),
    "huge tree_budget": ({"hedgerow": {"speculation": {"tree_budget": 1 << 20}}},  # refused by the server
                         "hedgerow.speculation.tree_budget"),
    "misspelt speculation field": ({"hedgerow": {"speculation": {"mdoe": "plain"}}}, "hedgerow.speculation.mdoe"),
    "unknown parameter": ({"temprature": 0.5}, "temprature"),
    "temperature of the wrong type": ({"temperature": "hot"}, "temperature"),
}
CHAT_BAD = {
    "n=17": ({"n": 17}, "n"),
    "logprobs 2": ({"logprobs": 2}, "logprobs"),
    "top_logprobs without logprobs": ({"top_logprobs": 2}, "top_logprobs"),
    "top_logprobs 21": ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    "tools": ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    "tool_choice": ({"tool_choice": "required"}, "tool_choice"),
    "functions": ({"functions": [{"name": "f"}]}, "functions"),
    "json response_format": ({"response_format": {"type": "json_object"}}, "response_format"),
    "no messages": ({"messages": []}, "messages"),
    "image part": ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
                   "messages[0].content[0]"),
    "tool message": ({"messages": [{"role": "tool", "content": "1", "tool_call_id": "c"}]}, "messages[0].role"),
    "unknown role": ({"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role"),
    "temperature -1": ({"temperature": -1}, "temperature"),
    "max_completion_tokens 0": ({"max_completion_tokens": 0}, "max_completion_tokens"),
}


@pytest.mark.live
@pytest.mark.parametrize("case", list(COMPLETION_BAD))
def test_bad_completion_parameters_are_400(proxy, model, case):
    edit, param = COMPLETION_BAD[case]
    body = {k: v for k, v in {"model": model, "prompt": "x", "max_tokens": 4, **edit}.items() if v is not None}
    for stream in (False, True):
        r = proxy.post("/v1/completions", {**body, "stream": stream} if "stream_options" not in edit else body)
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["param"] == param and error["type"] == "invalid_request_error", error
        assert error["message"] and set(error) == {"message", "type", "param", "code"}


@pytest.mark.live
@pytest.mark.parametrize("case", list(CHAT_BAD))
def test_bad_chat_parameters_are_400(proxy, model, case):
    edit, param = CHAT_BAD[case]
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], **edit}
    r = proxy.post("/v1/chat/completions", body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.json()


@pytest.mark.live
def test_the_client_sees_refusals_as_bad_request(proxy, client, model):
    bad_mode = {"extra_body": {"hedgerow": {"speculation": {"mode": "x"}}}}
    for kw in ({"n": 17}, {"temperature": -1}, {"logprobs": 21}, bad_mode):
        with pytest.raises(openai.BadRequestError):
            client.completions.create(model=model, prompt="x", max_tokens=4, **kw)
    for content in (b"{not json", b""):
        r = httpx.post(proxy.url + "/v1/completions", content=content, headers={"content-type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["message"], r.text


@pytest.mark.live
def test_a_wrong_key_is_401(backend, model):
    with LiveProxy(backend.address, api_key="sesame") as p:
        for key in ("wrong", "sesame-and-more"):
            with pytest.raises(openai.AuthenticationError) as err:
                p.client(key).completions.create(model=model, prompt="x", max_tokens=2)
            assert err.value.body["code"] == "invalid_api_key"
            with pytest.raises(openai.AuthenticationError):
                p.client(key).models.list()
        assert httpx.get(p.url + "/v1/models", timeout=10).status_code == 401  # no key at all
        assert p.client("sesame").completions.create(model=model, prompt="x", max_tokens=2).usage.completion_tokens
        assert httpx.get(p.url + "/health", timeout=10).json() == {"status": "ok"}  # health needs no key


@pytest.mark.live
def test_a_deadline_is_504(backend, model):
    backend.delay = 0.05
    try:
        with LiveProxy(backend.address, request_timeout=0.3) as p:
            for stream in (False, True):
                r = p.post("/v1/completions", {"model": model, "prompt": "x", "max_tokens": 100, "ignore_eos": True,
                                               "stream": stream})
                if stream and r.status_code == 200:  # the deadline passed after the first message
                    assert '"code":"deadline_exceeded"' in r.text and r.text.endswith("data: [DONE]\n\n")
                else:
                    assert r.status_code == 504 and r.json()["error"]["code"] == "deadline_exceeded", r.text
    finally:
        backend.delay = 0.0
    backend.wait_idle()


@pytest.mark.unit
def test_grpc_status_codes_map_to_http():
    S = grpc.StatusCode
    for code, status in ((S.INVALID_ARGUMENT, 400), (S.RESOURCE_EXHAUSTED, 429), (S.UNAVAILABLE, 503),
                         (S.DEADLINE_EXCEEDED, 504), (S.INTERNAL, 500), (S.UNKNOWN, 500)):
        assert grpc_error(FailedCall(code, "x")).status == status
    e = grpc_error(FailedCall(S.INVALID_ARGUMENT, "sampling.top_p must be in (0, 1], got 1.5"))
    assert (e.param, e.message) == ("top_p", "top_p must be in (0, 1], got 1.5")
    e = grpc_error(FailedCall(S.INVALID_ARGUMENT, "prompt is 300 tokens; ..."), prompt_param="messages")
    assert e.param == "messages"
    e = grpc_error(FailedCall(S.INVALID_ARGUMENT, "speculation mode chain needs a draft model; this server has none"))
    assert e.param == "hedgerow.speculation.mode"


# --- the server away, the client away ------------------------------------------------------------
def _closed_port() -> int:
    sock = listen("127.0.0.1", 0)
    port = sock.getsockname()[1]
    sock.close()
    return port


@pytest.mark.live
def test_server_down_is_503_through_hedgerow_proxy(tiny_folders):
    """``hedgerow proxy`` as its own process, pointed at a closed port: it starts, answers 503 in
    OpenAI's error JSON (naming no address), and exits 0 on SIGTERM."""
    port = _closed_port()
    with ProxyProcess("--grpc", f"127.0.0.1:{port}", "--tokenizer", str(tiny_folders["target"])) as p:
        client = openai.OpenAI(base_url=p.url + "/v1", api_key="x", max_retries=0, timeout=30)
        for call in (client.models.list,
                     lambda: client.completions.create(model="m", prompt="x", max_tokens=2),
                     lambda: client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])):
            with pytest.raises(openai.InternalServerError) as err:
                call()
            assert err.value.status_code == 503 and err.value.body["code"] == "unavailable"
            assert "unavailable" in err.value.message and str(port) not in err.value.message
        assert httpx.get(p.url + "/health", timeout=10).status_code == 503
        p.proc.send_signal(signal.SIGTERM)
        assert p.proc.wait(timeout=30) == 0


def cancelled(server) -> float:
    return server.sample("hedgerow_requests_total", status="cancelled")


@pytest.mark.live
def test_a_client_that_leaves_frees_the_kv_slot(backend, proxy, model):
    backend.delay = 0.03
    try:
        before = cancelled(backend)
        body = {"model": model, "prompt": TEXT_PROMPTS[0], "max_tokens": 100, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", proxy.url + "/v1/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            assert next(line for line in lines if line).startswith("data: ")
            assert backend.engine_state()[0] == 1  # generating
        backend.wait_until(lambda: backend.engine_state() == (0, 0, 0, 0) and cancelled(backend) == before + 1,
                           "slot freed after the client left")

        before = cancelled(backend)
        with pytest.raises(httpx.ReadTimeout):  # a unary request whose client gives up
            httpx.post(proxy.url + "/v1/completions", json={**body, "stream": False}, timeout=0.5)
        backend.wait_until(lambda: backend.engine_state() == (0, 0, 0, 0) and cancelled(backend) == before + 1,
                           "slot freed after the client left")
    finally:
        backend.delay = 0.0


@pytest.mark.unit
def test_hedgerow_proxy_is_a_cli_subcommand(capsys):
    from hedgerow.server.cli import main

    assert main(["proxy", "--grpc", "no-port"]) == 2
    assert "--grpc" in capsys.readouterr().err
