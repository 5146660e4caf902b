"""``hedgerow bench serve``, the serving load client: gRPC against a server in process (closed and
open loop), OpenAI server-sent events against a stub, and an unreachable server in one line."""

from __future__ import annotations

import asyncio
import http.server
import json
import threading
from contextlib import contextmanager

import pytest

from hedgerow.server.proxy.schema import CompletionRequest
from tests import bench_common
from tests.bench_common import HAS_MPL, bench, plots

pytestmark = pytest.mark.live
prompts_file = bench_common.prompts_file  # a fixture, shared with the other bench tests


@contextmanager
def grpc_server(folders):
    from hedgerow.server.engine.engine import Engine, EngineConfig
    from hedgerow.server.engine.runner import ModelRunner
    from hedgerow.server.models.loader import load_pair
    from hedgerow.server.service import grpc_service

    pair = load_pair(str(folders["target"]), str(folders["draft"]))
    engine = Engine(ModelRunner(pair.target, num_slots=4, max_len=128),
                    ModelRunner(pair.draft, num_slots=4, max_len=128),
                    eos_token_ids=[pair.tokenizer.eos_token_id], config=EngineConfig(max_model_len=128, max_batch_size=4))
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    server = asyncio.run_coroutine_threadsafe(grpc_service.start_server(engine, pair.tokenizer, port=0), loop).result(60)
    try:
        yield f"127.0.0.1:{server.port}"
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(None), loop).result(60)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


def _check_serve(data, levels, modes):
    assert data["config"]["kind"] == "serve"
    assert [(r["concurrency"], r["speculation"]) for r in data["results"]] == [(c, m) for c in levels for m in modes]
    for r in data["results"]:
        assert r["failed"] == 0 and r["requests"] >= 1, r["errors"]
        assert r["tokens_per_second"] > 0 and r["requests_per_second"] > 0
        for key in ("ttft_seconds", "itl_seconds", "e2e_seconds"):
            d = r[key]
            assert d["p50"] <= d["p90"] <= d["p99"], (key, d)
        assert r["ttft_seconds"]["p50"] <= r["e2e_seconds"]["p50"]
        if r["speculation"] == "plain":
            assert r["vs_plain"] is None
        else:
            assert r["vs_plain"]["tokens_per_second"] > 0


def test_serve_grpc(tiny_folders, prompts_file, tmp_path):
    out = tmp_path / "serve.json"
    with grpc_server(tiny_folders) as addr:
        assert bench("serve", "--grpc", addr, "--concurrency", "1,3", "--requests", "4", "--spec-modes", "plain,chain",
                     "--prompts", str(prompts_file), "--max-new-tokens", "8", "--ignore-eos", "--warmup", "1",
                     "--output", str(out), *plots(tmp_path)) == 0
    data = json.loads(out.read_text())
    _check_serve(data, [1, 3], ["plain", "chain"])
    assert all(r["generated_tokens"] == 4 * 8 for r in data["results"])  # EOS ignored: 8 tokens each
    assert data["config"]["server"]["max_batch_size"] == 4
    if HAS_MPL:
        assert (tmp_path / "serve_e2e_cdf.png").is_file() and (tmp_path / "serve_ttft_cdf.png").is_file()


def test_serve_grpc_open_loop(tiny_folders, prompts_file, tmp_path):
    out = tmp_path / "serve.json"
    with grpc_server(tiny_folders) as addr:
        assert bench("serve", "--grpc", addr, "--concurrency", "2", "--duration", "0.5", "--rate", "20",
                     "--spec-modes", "plain,tree", "--prompts", str(prompts_file), "--max-new-tokens", "4",
                     "--warmup", "0", "--output", str(out)) == 0
    _check_serve(json.loads(out.read_text()), [2], ["plain", "tree"])


class _FakeOpenAI(http.server.BaseHTTPRequestHandler):
    """/v1/completions streaming three chunks of text, then usage, then [DONE]."""

    seen: list = []

    def do_GET(self):
        body = json.dumps({"data": [{"id": "fake"}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).seen.append(req)
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        for text in ("a", "bc", "d"):
            chunk = {"object": "text_completion", "choices": [{"index": 0, "text": text, "finish_reason": None}]}
            self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
            self.wfile.flush()
        usage = {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 6}}
        self.wfile.write(f"data: {json.dumps(usage)}\n\ndata: [DONE]\n\n".encode())

    def log_message(self, *args):
        pass


def test_serve_openai_sse(prompts_file, tmp_path):
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FakeOpenAI)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    out = tmp_path / "openai.json"
    try:
        assert bench("serve", "--openai", f"http://127.0.0.1:{httpd.server_port}", "--concurrency", "2",
                     "--requests", "3", "--prompts", str(prompts_file), "--max-new-tokens", "6", "--warmup", "0",
                     "--output", str(out)) == 0
    finally:
        httpd.shutdown()
    data = json.loads(out.read_text())
    _check_serve(data, [2], ["plain", "chain"])
    assert all(r["generated_tokens"] == 3 * 6 for r in data["results"])  # from usage.completion_tokens
    sent = _FakeOpenAI.seen
    assert {r["hedgerow"]["speculation"]["mode"] for r in sent} == {"plain", "chain"}
    for body in sent:  # what the bench sends is a request the proxy accepts (its schema forbids unknown fields)
        CompletionRequest.model_validate(body)
    assert all(r["stream"] and r["max_tokens"] == 6 for r in sent)


def test_serve_unreachable_is_one_line(prompts_file, capsys):
    code = bench("serve", "--grpc", "127.0.0.1:1", "--requests", "1", "--prompts", str(prompts_file),
                 "--timeout", "2")
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
