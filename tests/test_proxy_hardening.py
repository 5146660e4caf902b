"""The OpenAI-compatible proxy against hostile and faulty clients (conftest's ``backend``, ``proxy``,
``model``): the key is checked before a body is read, bodies are bounded, every bad value is a 400
naming its parameter and nothing a client sends is a bare 500, oversized prompts are refused by name
and counted, the proxy is back within about a second of its server, and what it exposes (docs,
addresses, secrets on the command line) is kept in."""

from __future__ import annotations

import json
import socket
import ssl
import threading
import time

import httpx
import pytest

from hedgerow.server.proxy.backend import grpc_error
from hedgerow.server.proxy.cli import add_arguments, config_from_args
from hedgerow.server.service.requests import ServiceConfig
from tests.live import FailedCall, LiveProxy, ProxyProcess, memory_kib, req, self_signed_certificate, text_server

openai = pytest.importorskip("openai", reason="the proxy tests drive the official client: pip install openai")


def post_json_text(url: str, text: str, **kw) -> httpx.Response:
    """POST a JSON body given as text, which may spell what httpx's own encoder refuses ("\\ud800")."""
    headers = {"content-type": "application/json", **kw.pop("headers", {})}
    return httpx.post(url, content=text.encode(), headers=headers, timeout=60, **kw)


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- the key, then the body ----------------------------------------------------------------------
def _read_response(sock: socket.socket) -> bytes:
    """One HTTP response: its headers, then the body its Content-Length announces (or up to EOF)."""
    reply = b""
    while b"\r\n\r\n" not in reply:
        chunk = sock.recv(4096)
        if not chunk:
            return reply
        reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")), None)
    while length is None or len(body) < length:
        chunk = sock.recv(4096)
        if not chunk:
            break
        body += chunk
    return head + b"\r\n\r\n" + body


@pytest.mark.live
def test_an_unauthenticated_100mb_body_is_refused_unread():
    """401 after the headers; the proxy's peak memory grows by less than 4 MiB and the connection is
    closed long before 100 MB are sent."""
    size = 100 << 20
    with ProxyProcess("--grpc", f"127.0.0.1:{_closed_port()}", env={"HEDGEROW_API_KEY": "sesame"}) as p:
        assert httpx.post(p.url + "/v1/completions", content=b"{}", timeout=10).status_code == 401  # warm
        before = memory_kib(p.proc.pid)["VmHWM"]
        sock = socket.create_connection(("127.0.0.1", p.port), timeout=30)
        sock.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {size}\r\n\r\n".encode())
        sent = [0]

        def send_body():
            chunk = b" " * (1 << 16)
            try:
                while sent[0] < size:
                    sock.sendall(chunk)
                    sent[0] += len(chunk)
            except OSError:  # the proxy closed the connection: what the test expects
                pass

        sender = threading.Thread(target=send_body)
        sender.start()
        reply = _read_response(sock)
        sender.join(60)
        sock.close()
        assert reply.startswith(b"HTTP/1.1 401"), reply[:200]
        assert b'"code":"invalid_api_key"' in reply.replace(b" ", b"")
        assert sent[0] < size // 2, f"the proxy read {sent[0]} bytes"
        grown = memory_kib(p.proc.pid)["VmHWM"] - before
        assert grown < 4096, f"the proxy's peak memory grew by {grown} KiB"


@pytest.mark.live
def test_the_key_comes_before_the_body_and_bodies_are_bounded(backend, model):
    with LiveProxy(backend.address, api_key="sesame", max_body_bytes=10_000) as p:
        r = post_json_text(p.url + "/v1/completions", "{not json")
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        key = {"authorization": "Bearer sesame"}
        big = json.dumps({"model": model, "prompt": "x" * 20_000})
        r = post_json_text(p.url + "/v1/completions", big, headers=key)  # Content-Length says it
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large", r.text

        def chunked():  # no Content-Length: counted as it arrives
            for i in range(0, len(big), 1000):
                yield big[i:i + 1000].encode()

        r = httpx.post(p.url + "/v1/completions", content=chunked(), headers=key, timeout=60)
        assert r.status_code == 413 and set(r.json()["error"]) == {"message", "type", "param", "code"}
        ok = post_json_text(p.url + "/v1/completions", json.dumps({"model": model, "prompt": "x", "max_tokens": 2}),
                            headers=key)
        assert ok.status_code == 200, ok.text
        for path in ("/docs", "/redoc", "/openapi.json"):  # no documentation of the API without the key...
            assert httpx.get(p.url + path, timeout=10).status_code == 401
            assert httpx.get(p.url + path, headers=key, timeout=10).status_code == 404  # ... nor with it
    with LiveProxy(backend.address) as p:  # an open proxy documents itself
        assert httpx.get(p.url + "/openapi.json", timeout=10).status_code == 200


# --- bad values are 400s, nothing is a bare 500 --------------------------------------------------
BAD_VALUES = {  # body edits -> the parameter the 400 names
    "token id 2^32": ({"prompt": [5, 2**32]}, "prompt"),
    "max_tokens 2^31": ({"max_tokens": 2**31}, "max_tokens"),
    "top_k 2^31": ({"top_k": 2**31}, "top_k"),
    "draft_tokens 2^31": ({"hedgerow": {"speculation": {"draft_tokens": 2**31}}}, "hedgerow.speculation.draft_tokens"),
    "tree_budget -2^40": ({"hedgerow": {"speculation": {"tree_budget": -(2**40)}}},
                          "hedgerow.speculation.tree_budget"),
    "draft_tokens over the shared limit": ({"hedgerow": {"speculation": {"draft_tokens": 65}}},
                                           "hedgerow.speculation.draft_tokens"),
    "seed 2^64": ({"seed": 2**64}, "seed"),
    "stream 'yes'": ({"stream": "yes"}, "stream"),
    "max_tokens true": ({"max_tokens": True}, "max_tokens"),
    "ignore_eos 1": ({"ignore_eos": 1}, "ignore_eos"),
    "lone surrogate in the prompt": ({"prompt": "\ud800"}, "prompt"),
    "lone surrogate in a stop string": ({"stop": ["ok", "\udfff"]}, "stop[1]"),
    "lone surrogate in the model": ({"model": "m\ud800"}, "model"),
}


@pytest.mark.live
@pytest.mark.parametrize("case", list(BAD_VALUES))
def test_bad_values_are_400_naming_the_parameter(proxy, model, case):
    edit, param = BAD_VALUES[case]
    body = {"model": model, "prompt": "x", "max_tokens": 4, **edit}
    for stream in ((False, True) if "stream" not in edit else (edit["stream"],)):
        r = post_json_text(proxy.url + "/v1/completions", json.dumps({**body, "stream": stream}))
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == param and r.json()["error"]["type"] == "invalid_request_error", r.text


@pytest.mark.live
def test_a_lone_surrogate_in_a_chat_is_400(proxy, model):
    body = {"model": model, "messages": [{"role": "user", "content": "hi \ud83d"}]}
    r = post_json_text(proxy.url + "/v1/chat/completions", json.dumps(body))
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages[0].content", r.text


@pytest.mark.live
def test_a_bug_is_a_500_in_openai_json_without_a_traceback(proxy, model, monkeypatch):
    def broken(*args, **kw):
        raise RuntimeError("boom in /srv/secret/path.py")

    monkeypatch.setattr("hedgerow.server.proxy.app.to_proto", broken)
    r = proxy.post("/v1/completions", {"model": model, "prompt": "x", "max_tokens": 2})
    assert r.status_code == 500 and r.json()["error"]["type"] == "server_error", r.text
    assert "boom" not in r.text and "secret" not in r.text and "Traceback" not in r.text


# --- bodies that are not JSON --------------------------------------------------------------------
@pytest.mark.live
def test_a_body_without_a_content_type_is_json_and_another_type_is_415(proxy, model):
    body = json.dumps({"model": model, "prompt": "x", "max_tokens": 2}).encode()
    r = httpx.post(proxy.url + "/v1/completions", content=body, timeout=60)  # no Content-Type at all
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2, r.text
    r = httpx.post(proxy.url + "/v1/completions", content=body, headers={"content-type": "text/plain"}, timeout=60)
    assert r.status_code == 415 and "application/json" in r.json()["error"]["message"], r.text


# --- oversized prompts ---------------------------------------------------------------------------
@pytest.mark.live
def test_an_oversized_prompt_is_400_naming_it_and_counted(backend, proxy, model):
    before = backend.sample("hedgerow_requests_total", status="invalid_argument")
    r = proxy.post("/v1/completions", {"model": model, "prompt": "x" * (2 << 20), "max_tokens": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt", r.text
    assert "bytes; at most 1048576" in r.json()["error"]["message"]
    assert backend.sample("hedgerow_requests_total", status="invalid_argument") == before + 1


@pytest.mark.unit
def test_a_message_too_large_for_grpc_is_413_and_a_full_queue_429():
    import grpc

    e = grpc_error(FailedCall(grpc.StatusCode.RESOURCE_EXHAUSTED, "Received message larger than max (9000000 vs. 4266432)"))
    assert e.status == 413 and "9000000" in e.message and e.code == "request_too_large"
    assert grpc_error(FailedCall(grpc.StatusCode.RESOURCE_EXHAUSTED, "the waiting queue is full")).status == 429
    e = grpc_error(FailedCall(grpc.StatusCode.UNAVAILABLE, "failed to connect to all addresses; ipv4:10.1.2.3:50051"))
    assert e.status == 503 and "10.1.2.3" not in e.message and "50051" not in e.message


# --- the server away and back --------------------------------------------------------------------
@pytest.mark.slow
def test_the_proxy_is_back_within_a_second_of_its_server(tiny_folders, model):
    port = _closed_port()
    body = {"model": model, "prompt": "x", "max_tokens": 2}
    server = text_server(tiny_folders, port=port)
    with LiveProxy(f"127.0.0.1:{port}") as p:
        assert p.post("/v1/completions", body).status_code == 200
        server.close()
        down = time.monotonic()
        while time.monotonic() - down < 10:  # long enough for gRPC's default backoff to pass 6 s
            r = p.post("/v1/completions", body)
            assert r.status_code == 503 and str(port) not in r.text, r.text
        with text_server(tiny_folders, port=port):
            back = time.monotonic()
            while (r := p.post("/v1/completions", body)).status_code != 200:
                assert r.status_code == 503, r.text
                assert time.monotonic() - back < 10, "the proxy did not reconnect"
            waited = time.monotonic() - back
        assert waited < 1.6, f"the proxy answered 503 for {waited:.1f} s after its server was back"


# --- what the proxy exposes ----------------------------------------------------------------------
@pytest.mark.unit
def test_the_key_is_read_from_the_environment_or_a_file(monkeypatch, tmp_path, capsys):
    import argparse

    from hedgerow.server.errors import HedgerowError

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    monkeypatch.setenv("HEDGEROW_API_KEY", "from-env")
    config = config_from_args(parser.parse_args([]))
    assert config.api_key == "from-env" and config.grpc_api_key == "from-env"
    key_file = tmp_path / "key"
    key_file.write_text("from-file\n")
    assert config_from_args(parser.parse_args(["--api-key-file", str(key_file)])).api_key == "from-file"
    assert config_from_args(parser.parse_args(["--api-key", "from-argv"])).api_key == "from-argv"
    with pytest.raises(HedgerowError, match="not both"):
        config_from_args(parser.parse_args(["--api-key", "a", "--api-key-file", str(key_file)]))
    key_file.write_text("\n")
    with pytest.raises(HedgerowError, match="empty"):
        config_from_args(parser.parse_args(["--api-key-file", str(key_file)]))
    monkeypatch.delenv("HEDGEROW_API_KEY")
    assert config_from_args(parser.parse_args([])).api_key is None
    parser.print_help()
    assert "`ps`" in capsys.readouterr().out  # --api-key says that argv is visible


@pytest.mark.live
def test_the_proxy_sends_its_key_to_the_grpc_server(tiny_folders):
    with text_server(tiny_folders, api_key="inner") as server:
        body = {"model": str(tiny_folders["target"]), "prompt": "x", "max_tokens": 2}
        with LiveProxy(server.address, api_key="outer", grpc_api_key="inner") as p:
            r = p.post("/v1/completions", body, headers={"authorization": "Bearer outer"})
            assert r.status_code == 200, r.text
        with LiveProxy(server.address, grpc_api_key="wrong") as p:
            r = httpx.get(p.url + "/v1/models", timeout=30)
            assert r.status_code == 500 and r.json()["error"]["code"] == "backend_unauthenticated", r.text


@pytest.mark.live
def test_https(tmp_path):
    made = self_signed_certificate(tmp_path)
    if isinstance(made, str):
        pytest.skip(made)
    cert, key = made
    with ProxyProcess("--grpc", f"127.0.0.1:{_closed_port()}", "--tls-cert", str(cert), "--tls-key", str(key)) as p:
        assert p.url.startswith("https://")
        r = httpx.get(p.url + "/health", verify=ssl.create_default_context(cafile=str(cert)), timeout=30)
        assert r.status_code == 503 and r.json() == {"status": "unavailable"}
        with pytest.raises(httpx.HTTPError):
            httpx.get(p.url.replace("https", "http") + "/health", timeout=10)


# --- the embedded pair, chat -----------------------------------------------------------------------
@pytest.mark.live
def test_chat_on_the_embedded_pair_through_the_openai_client():
    """The embedded pair is served as ``hedgerow-embedded``; the proxy finds its tokenizer, chat
    template included, from that name alone."""
    from hedgerow.server.embedded import default_pair
    from hedgerow.server.service.serve import served_names

    target, draft = default_pair()
    names = served_names(target, draft, None)
    config = ServiceConfig(target_name=names[0], draft_name=names[1])
    with text_server({"target": target, "draft": draft}, config=config) as server, LiveProxy(server.address) as p:
        client = p.client()
        assert [m.id for m in client.models.list().data] == ["hedgerow-embedded"]
        messages = [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "Add two numbers."}]
        out = client.chat.completions.create(model="hedgerow-embedded", messages=messages, max_tokens=16)
        rendered = server.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert rendered.endswith("# assistant:\n")
        ids = server.tokenizer.encode(rendered, add_special_tokens=False)
        ref = server.stub.Generate(req(ids, 16), timeout=60)
        assert out.choices[0].message.content == ref.text and out.usage.prompt_tokens == len(ids)
        with pytest.raises(openai.NotFoundError) as err:
            client.chat.completions.create(model="gpt-4o", messages=messages, max_tokens=2)
        assert "'hedgerow-embedded'" in err.value.message and target not in err.value.message
