"""The OpenAI-compatible proxy, live: a gRPC server in-process on a free port (tiny random Llama
pair with a real byte-level BPE tokenizer), proxies on free ports in uvicorn threads, driven by the
official ``openai`` client (and raw HTTP where the client would hide what is sent).

Checked against references: the proxy's text is the gRPC server's own; streamed text equals unary
text under greedy; speculation settings leave greedy output unchanged; chat output is the completion
of the rendered chat template. Refusals: bad parameters (400, naming the parameter), wrong key
(401), server down (503, also through ``hedgerow proxy`` as a process), deadline (504), a model
without a chat template (400). A client that goes away cancels its gRPC call and frees the KV slot.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import httpx
import pytest

openai = pytest.importorskip("openai", reason="the proxy tests drive the official client: pip install openai")
pytest.importorskip("fastapi", reason="the proxy needs fastapi and uvicorn")
uvicorn = pytest.importorskip("uvicorn", reason="the proxy needs fastapi and uvicorn")

from hedgerow.server.engine.engine import Engine, EngineConfig  # noqa: E402
from hedgerow.server.service.grpc_service import ServiceConfig  # noqa: E402
from hedgerow.server.models.loader import load_pair  # noqa: E402
from hedgerow.server.proxy.app import ProxyConfig, create_app, grpc_error, listen  # noqa: E402
from hedgerow.server.rpc import generation_pb2 as pb  # noqa: E402
from hedgerow.server.engine.runner import ModelRunner  # noqa: E402
from hedgerow.server.engine.sequence import SpecParams  # noqa: E402
from tests.live import LiveServer  # noqa: E402

PROMPTS = ["def fibonacci(n):", "import os\n", "for i in range(10):"]
CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")


# --- harness -------------------------------------------------------------------------------------
class GrpcHarness(LiveServer):
    """``hedgerow serve``'s service on its own event-loop thread; ``delay`` slows every target pass."""

    def __init__(self, folders):
        pair = load_pair(str(folders["target"]), str(folders["draft"]))
        self.tokenizer = pair.tokenizer
        self.delay = 0.0
        config = EngineConfig(max_model_len=128, max_batch_size=4, adaptive="none", spec=SpecParams(draft_tokens=3))
        engine = Engine(ModelRunner(pair.target, num_slots=4, max_len=128),
                        ModelRunner(pair.draft, num_slots=4, max_len=128),
                        eos_token_ids=[pair.tokenizer.eos_token_id], config=config)
        forward = engine.target.forward

        def slowed(slots, flat):
            time.sleep(self.delay)
            return forward(slots, flat)

        engine.target.forward = slowed
        service = ServiceConfig(target_name=str(folders["target"]), draft_name=str(folders["draft"]))
        super().__init__(engine, pair.tokenizer, config=service)

    def busy(self) -> tuple[int, int, int]:
        """(target KV slots in use, running, waiting), read on the engine thread."""
        return self.server.engine.call(
            lambda e: (e.target.cache.slots_in_use, len(e.scheduler.running), len(e.scheduler.waiting)))

    def cancelled(self) -> float:
        return self.metrics.registry.get_sample_value("hedgerow_requests_total", {"status": "cancelled"}) or 0.0

    def wait_until(self, check, what: str, timeout=20.0):
        deadline = time.monotonic() + timeout
        while not check():
            assert time.monotonic() < deadline, f"{what}: still {self.busy()}, cancelled {self.cancelled()}"
            time.sleep(0.02)


class ProxyHarness:
    """The proxy app in uvicorn on a free port, in a thread."""

    def __init__(self, config: ProxyConfig):
        sock = listen("127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(create_app(config), log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "the proxy did not start"
            time.sleep(0.01)

    def client(self, key="none", **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=60, **kw)

    def post(self, path: str, body: dict, **kw) -> httpx.Response:
        return httpx.post(self.url + path, json=body, timeout=60, **kw)

    def close(self):
        self.server.should_exit = True
        self.thread.join(20)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core machine OpenMP's
    spinning threads made a 24-token request take seconds instead of a tenth of one."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def backend(tiny_folders):
    h = GrpcHarness(tiny_folders)
    yield h
    h.close()


@pytest.fixture(scope="module")
def proxy(backend):
    p = ProxyHarness(ProxyConfig(grpc_target=backend.address))
    yield p
    p.close()


@pytest.fixture(scope="module")
def client(proxy):
    return proxy.client()


@pytest.fixture(scope="module")
def model(backend):
    return backend.stub.ModelInfo(pb.ModelInfoRequest(), timeout=10).target


@pytest.fixture(scope="module")
def chat_tokenizer(tiny_folders, tmp_path_factory):
    """A copy of the tiny tokenizer with a chat template."""
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("chat-tokenizer")
    tok = AutoTokenizer.from_pretrained(str(tiny_folders["target"]))
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(folder)
    return folder


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
    assert card["hedgerow"]["default_speculation"] == {"mode": "chain", "max_draft_tokens": 3, "tree_budget": 16}
    assert client.models.retrieve(model).id == model
    with pytest.raises(openai.NotFoundError) as err:
        client.models.retrieve("gpt-4o")
    assert err.value.body["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4o", prompt="x", max_tokens=2)


# --- completions ---------------------------------------------------------------------------------
def test_completions_unary_and_stream_are_the_servers_greedy_output(backend, client, model):
    for prompt in PROMPTS:
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
    body = {"model": model, "prompt": PROMPTS[0], "max_tokens": 8, "stream": True}
    with httpx.stream("POST", proxy.url + "/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    assert "usage" not in chunks[-1] and chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_token_id_prompts_and_batches_of_one(backend, client, model):
    ids = backend.tokenizer.encode(PROMPTS[1])
    want = client.completions.create(model=model, prompt=PROMPTS[1], max_tokens=12).choices[0].text
    assert client.completions.create(model=model, prompt=ids, max_tokens=12).choices[0].text == want
    assert client.completions.create(model=model, prompt=[ids], max_tokens=12).choices[0].text == want
    assert client.completions.create(model=model, prompt=[PROMPTS[1]], max_tokens=12).choices[0].text == want


def test_stop_strings_and_finish_reasons(client, model):
    full = client.completions.create(model=model, prompt=PROMPTS[0], max_tokens=40,
                                     extra_body={"ignore_eos": True}).choices[0]
    assert full.finish_reason == "length" and len(full.text) > 10
    stop = full.text[len(full.text) // 2: len(full.text) // 2 + 2]
    want = full.text[: full.text.find(stop)]
    for stops in (stop, ["never \x00", stop]):
        cut = client.completions.create(model=model, prompt=PROMPTS[0], max_tokens=40, stop=stops,
                                        extra_body={"ignore_eos": True}).choices[0]
        assert (cut.text, cut.finish_reason) == (want, "stop")
        text, chunks = stream_text(client.completions.create(model=model, prompt=PROMPTS[0], max_tokens=40,
                                                             stop=stops, stream=True, extra_body={"ignore_eos": True}))
        assert text == want and chunks[-1].choices[0].finish_reason == "stop"
    short = client.completions.create(model=model, prompt=PROMPTS[0], max_tokens=3, extra_body={"ignore_eos": True})
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 3


def test_speculation_settings_keep_greedy_output(client, model):
    def run(speculation):
        out = client.completions.create(model=model, prompt=PROMPTS[2], max_tokens=24,
                                        extra_body={"hedgerow": {"speculation": speculation}})
        return out.choices[0].text, out.model_dump()["hedgerow"]

    base, _ = run({})
    off_text, off = run({"mode": "off"})
    assert off_text == base and off["draft_tokens"] == 0 and off["acceptance_rate"] is None
    chain_text, chain = run({"mode": "chain", "max_draft_tokens": 1})
    assert chain_text == base and 0 < chain["draft_tokens"] <= chain["verify_steps"]
    tree_text, tree = run({"mode": "tree", "tree_budget": 8})
    assert tree_text == base and tree["draft_tokens"] > 0


def test_seeded_sampling_is_reproducible(client, model):
    kw = dict(model=model, prompt=PROMPTS[0], max_tokens=16, temperature=0.9, top_p=0.95, seed=7,
              extra_body={"top_k": 50})
    first = client.completions.create(**kw).choices[0].text
    assert client.completions.create(**kw).choices[0].text == first
    assert stream_text(client.completions.create(stream=True, **kw))[0] == first


def test_concurrent_requests_get_their_own_output(client, model):
    want = {p: client.completions.create(model=model, prompt=p, max_tokens=16).choices[0].text for p in PROMPTS}
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda i: client.completions.create(
            model=model, prompt=PROMPTS[i % 3], max_tokens=16).choices[0].text, range(9)))
    assert got == [want[PROMPTS[i % 3]] for i in range(9)]


# --- chat ----------------------------------------------------------------------------------------
def test_chat_needs_a_chat_template(client, model):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}])
    assert err.value.body["code"] == "no_chat_template" and "chat template" in err.value.message


def test_chat_with_a_template(backend, chat_tokenizer, model):
    p = ProxyHarness(ProxyConfig(grpc_target=backend.address, tokenizer=str(chat_tokenizer)))
    try:
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
    finally:
        p.close()


# --- refusals ------------------------------------------------------------------------------------
COMPLETION_BAD = {  # an edit of a valid body -> the parameter the 400 names
    "n=2": ({"n": 2}, "n"),
    "logprobs": ({"logprobs": 2}, "logprobs"),
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
    "two prompts": ({"prompt": ["a", "b"]}, "prompt"),
    "token outside the vocabulary": ({"prompt": [5, 100_000]}, "prompt"),  # refused by the server
    "empty stop string": ({"stop": ["ok", ""]}, "stop[1]"),
    "stop of the wrong type": ({"stop": 5}, "stop"),
    "stream_options without stream": ({"stream_options": {"include_usage": True}}, "stream_options"),
    "unknown speculation mode": ({"hedgerow": {"speculation": {"mode": "warp"}}}, "hedgerow.speculation.mode"),
    "negative max_draft_tokens": ({"hedgerow": {"speculation": {"max_draft_tokens": -1}}},
                                  "hedgerow.speculation.max_draft_tokens"),
    "huge tree_budget": ({"hedgerow": {"speculation": {"tree_budget": 1 << 20}}},  # refused by the server
                         "hedgerow.speculation.tree_budget"),
    "misspelt speculation field": ({"hedgerow": {"speculation": {"mdoe": "off"}}}, "hedgerow.speculation.mdoe"),
    "unknown parameter": ({"temprature": 0.5}, "temprature"),
    "temperature of the wrong type": ({"temperature": "hot"}, "temperature"),
}
CHAT_BAD = {
    "n=2": ({"n": 2}, "n"),
    "logprobs": ({"logprobs": True}, "logprobs"),
    "top_logprobs": ({"top_logprobs": 2}, "top_logprobs"),
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


@pytest.mark.parametrize("case", list(CHAT_BAD))
def test_bad_chat_parameters_are_400(proxy, model, case):
    edit, param = CHAT_BAD[case]
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], **edit}
    r = proxy.post("/v1/chat/completions", body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.json()


def test_the_client_sees_refusals_as_bad_request(proxy, client, model):
    bad_mode = {"extra_body": {"hedgerow": {"speculation": {"mode": "x"}}}}
    for kw in ({"n": 2}, {"temperature": -1}, {"logprobs": 1}, bad_mode):
        with pytest.raises(openai.BadRequestError):
            client.completions.create(model=model, prompt="x", max_tokens=4, **kw)
    for content in (b"{not json", b""):
        r = httpx.post(proxy.url + "/v1/completions", content=content, headers={"content-type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["message"], r.text


def test_a_wrong_key_is_401(backend, model):
    p = ProxyHarness(ProxyConfig(grpc_target=backend.address, api_key="sesame"))
    try:
        for key in ("wrong", "sesame-and-more"):
            with pytest.raises(openai.AuthenticationError) as err:
                p.client(key).completions.create(model=model, prompt="x", max_tokens=2)
            assert err.value.body["code"] == "invalid_api_key"
            with pytest.raises(openai.AuthenticationError):
                p.client(key).models.list()
        assert httpx.get(p.url + "/v1/models", timeout=10).status_code == 401  # no key at all
        assert p.client("sesame").completions.create(model=model, prompt="x", max_tokens=2).usage.completion_tokens
        assert httpx.get(p.url + "/health", timeout=10).json() == {"status": "ok"}  # health needs no key
    finally:
        p.close()


def test_a_deadline_is_504(backend, model):
    p = ProxyHarness(ProxyConfig(grpc_target=backend.address, request_timeout=0.3))
    backend.delay = 0.05
    try:
        for stream in (False, True):
            r = p.post("/v1/completions", {"model": model, "prompt": "x", "max_tokens": 100, "ignore_eos": True,
                                           "stream": stream})
            if stream and r.status_code == 200:  # the deadline passed after the first message
                assert '"code":"deadline_exceeded"' in r.text and r.text.endswith("data: [DONE]\n\n")
            else:
                assert r.status_code == 504 and r.json()["error"]["code"] == "deadline_exceeded", r.text
    finally:
        backend.delay = 0.0
        p.close()
    backend.wait_until(lambda: backend.busy() == (0, 0, 0), "slots freed after the deadline")


def test_grpc_status_codes_map_to_http():
    class Failed(grpc.aio.AioRpcError):
        def __init__(self, code, details):
            self._c, self._d = code, details

        def code(self):
            return self._c

        def details(self):
            return self._d

    S = grpc.StatusCode
    for code, status in ((S.INVALID_ARGUMENT, 400), (S.RESOURCE_EXHAUSTED, 429), (S.UNAVAILABLE, 503),
                         (S.DEADLINE_EXCEEDED, 504), (S.INTERNAL, 500), (S.UNKNOWN, 500)):
        assert grpc_error(Failed(code, "x")).status == status
    e = grpc_error(Failed(S.INVALID_ARGUMENT, "sampling.top_p must be in (0, 1], got 1.5"))
    assert (e.param, e.message) == ("top_p", "top_p must be in (0, 1], got 1.5")
    e = grpc_error(Failed(S.INVALID_ARGUMENT, "prompt is 300 tokens; ..."), prompt_param="messages")
    assert e.param == "messages"
    e = grpc_error(Failed(S.INVALID_ARGUMENT, "speculation mode chain needs a draft model; this server has none"))
    assert e.param == "hedgerow.speculation.mode"


# --- the server away, the client away ------------------------------------------------------------
def _closed_port() -> int:
    sock = listen("127.0.0.1", 0)
    port = sock.getsockname()[1]
    sock.close()
    return port


def test_server_down_is_503_through_hedgerow_proxy(tiny_folders):
    """``hedgerow proxy`` as its own process (add_arguments/run, as the CLI wires them), pointed at a
    closed port: it starts, answers 503 in OpenAI's error JSON, and exits 0 on SIGTERM."""
    script = ("import argparse, sys; from hedgerow.server.proxy import app as proxy; p = argparse.ArgumentParser(); "
              "proxy.add_arguments(p); sys.exit(proxy.run(p.parse_args(sys.argv[1:])))")
    cmd = [sys.executable, "-c", script, "--grpc", f"127.0.0.1:{_closed_port()}", "--port", "0",
           "--tokenizer", str(tiny_folders["target"])]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        ready = re.fullmatch(r"hedgerow: OpenAI API on http://127\.0\.0\.1:(\d+)/v1, gRPC server .*\n", line)
        assert ready, (line, proc.stderr.read() if proc.poll() is not None else "")
        url = f"http://127.0.0.1:{ready.group(1)}"
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=30)
        for call in (client.models.list,
                     lambda: client.completions.create(model="m", prompt="x", max_tokens=2),
                     lambda: client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])):
            with pytest.raises(openai.InternalServerError) as err:
                call()
            assert err.value.status_code == 503 and err.value.body["code"] == "unavailable"
            assert "unavailable" in err.value.message
        assert httpx.get(url + "/health", timeout=10).status_code == 503
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_client_that_leaves_frees_the_kv_slot(backend, proxy, model):
    backend.delay = 0.03
    try:
        before = backend.cancelled()
        body = {"model": model, "prompt": PROMPTS[0], "max_tokens": 100, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", proxy.url + "/v1/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            assert next(line for line in lines if line).startswith("data: ")
            assert backend.busy()[0] == 1  # generating
        backend.wait_until(lambda: backend.busy() == (0, 0, 0) and backend.cancelled() == before + 1,
                           "slot freed after the client left")

        before = backend.cancelled()
        with pytest.raises(httpx.ReadTimeout):  # a unary request whose client gives up
            httpx.post(proxy.url + "/v1/completions", json={**body, "stream": False}, timeout=0.5)
        backend.wait_until(lambda: backend.busy() == (0, 0, 0) and backend.cancelled() == before + 1,
                           "slot freed after the client left")
    finally:
        backend.delay = 0.0


def test_hedgerow_proxy_is_a_cli_subcommand(capsys):
    from hedgerow.server.cli import main

    assert main(["proxy", "--grpc", "no-port"]) == 2
    assert "--grpc" in capsys.readouterr().err
