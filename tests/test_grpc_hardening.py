"""The gRPC server against hostile and faulty clients, and how it ends: a huge prompt costs the
other clients nothing, requests are bounded on the wire, undecodable bytes are INVALID_ARGUMENT
naming the field, the port is exclusive, an API key and TLS guard the service, a forced stop ends
each stream with FINISH_REASON_ABORT, health says NOT_SERVING while draining or once the engine
thread died, and the counters count what happened."""

from __future__ import annotations

import argparse
import asyncio
import re
import subprocess
import sys
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2

from hedgerow.server.errors import HedgerowError
from hedgerow.server.rpc import generation_pb2 as pb
from hedgerow.server.service.grpc_service import start_server
from hedgerow.server.service.requests import ServiceConfig
from tests.live import LiveServer, req, self_signed_certificate, text_server
from tests.tiny import PROMPTS, nudged_engine

SLOW = 0.02  # seconds added to every target pass, so that requests are surely in flight
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
INTERNALS = re.compile(r"<class|Error\b|Exception|Traceback|\.py\b|/")  # never in a status message


def health(h: LiveServer) -> int:
    return h.health.Check(health_pb2.HealthCheckRequest(service="hedgerow.v1.Generation"), timeout=5).status


# --- size ----------------------------------------------------------------------------------------
@pytest.mark.live
def test_a_4mb_prompt_is_refused_without_stalling_health(tiny_folders):
    """Refused by its size before it is tokenized, plain or gzip-compressed on the wire, while a
    health check never waits 0.2 s; the refusal is counted."""
    with text_server(tiny_folders) as h:
        prompt = "def f(x):\n    return x + 1\n" * (4_000_000 // 28)
        for compression in (None, grpc.Compression.Gzip):
            failed = []

            def send():
                try:
                    h.stub.Generate(req(prompt), timeout=60, compression=compression)
                except grpc.RpcError as exc:
                    failed.append(exc)

            sender = threading.Thread(target=send)
            sender.start()
            worst = 0.0
            while sender.is_alive():
                start = time.perf_counter()
                assert health(h) == SERVING
                worst = max(worst, time.perf_counter() - start)
            sender.join()
            assert worst < 0.2, f"a health check waited {worst:.2f} s ({compression})"
            assert failed[0].code() == grpc.StatusCode.INVALID_ARGUMENT, failed[0].details()
            assert re.match(r"prompt is (at least )?\d+ bytes; at most 1048576", failed[0].details())
        assert h.sample("hedgerow_requests_total", status="invalid_argument") == 2
        assert list(h.stub.Generate(req(PROMPTS[1], 4), timeout=30).token_ids)


@pytest.mark.live
def test_requests_are_bounded_on_the_wire(tiny_folders):
    """Over the byte cap: refused by name and counted; over gRPC's message limit (four times the
    largest valid request): refused by gRPC, compressed or not, before more is inflated."""
    config = ServiceConfig(max_prompt_bytes=1000)
    with text_server(tiny_folders, config=config) as h:
        limit = config.message_limit(128)
        with pytest.raises(grpc.RpcError) as err:
            h.stub.Generate(req("x" * (limit // 2)), timeout=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "at most 1000" in err.value.details()
        for compression in (None, grpc.Compression.Gzip):
            with pytest.raises(grpc.RpcError) as err:
                h.stub.Generate(req("x" * (limit + 1)), timeout=30, compression=compression)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.value.details()
            assert "larger than max" in err.value.details()
        assert h.sample("hedgerow_requests_total", status="invalid_argument") == 1
        assert h.serving()


# --- bytes that do not parse ---------------------------------------------------------------------
def _raw(msg: pb.GenerateRequest, old: bytes, new: bytes) -> bytes:
    data = msg.SerializeToString()
    assert old in data
    return data.replace(old, new)


UNDECODABLE = {  # raw request bytes -> what the message names
    "prompt": (_raw(req("abc", 4), b"abc", b"a\xffc"), "prompt is not valid UTF-8"),
    "stop string": (_raw(req("abc", 4, stop=["ok", "no"]), b"no", b"n\xc3"), "stopping.stop[1] is not valid UTF-8"),
    "request_id": (_raw(req("abc", 4, rid="rid"), b"rid", b"r\x80d"), "request_id is not valid UTF-8"),
    "corrupt bytes": (b"\x12\xff\xff", "not a valid hedgerow.v1.GenerateRequest message"),
}


@pytest.mark.live
@pytest.mark.parametrize("case", list(UNDECODABLE))
def test_undecodable_requests_are_invalid_argument_naming_the_field(backend, case):
    data, message = UNDECODABLE[case]
    server = backend  # conftest's text server
    calls = (server.channel.unary_unary("/hedgerow.v1.Generation/Generate"),
             lambda d, **kw: list(server.channel.unary_stream("/hedgerow.v1.Generation/GenerateStream")(d, **kw)))
    for call in calls:
        with pytest.raises(grpc.RpcError) as err:
            call(data, timeout=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
        assert message in err.value.details() and not INTERNALS.search(err.value.details()), err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        server.channel.unary_unary("/hedgerow.v1.Generation/ModelInfo")(b"\x08", timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and not INTERNALS.search(err.value.details())
    assert server.serving()


# --- the port ------------------------------------------------------------------------------------
@pytest.mark.live
def test_a_port_in_use_is_refused(tiny_folders, tiny_tokenizer, backend):
    """No second server shares a port (gRPC's default SO_REUSEPORT would let it take part of the
    traffic): in process it fails to start, and `hedgerow serve` says so in one line, exit 2,
    before loading any model."""
    port = backend.server.port
    with pytest.raises(HedgerowError, match=f"cannot listen on 127.0.0.1:{port}"):
        asyncio.run(start_server(nudged_engine(), tiny_tokenizer, port=port))
    cmd = [sys.executable, "-m", "hedgerow.server.cli", "serve", "--mode", "plain", "--target",
           str(tiny_folders["target"]), "--port", str(port), "--metrics-port", "0"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2, out.stderr
    assert out.stderr == f"hedgerow: error: 127.0.0.1:{port} is in use by another process (--host/--port)\n"


# --- stopping ------------------------------------------------------------------------------------
@pytest.mark.live
def test_draining_says_not_serving_and_lets_streams_finish(tiny_tokenizer):
    with LiveServer(nudged_engine(), tiny_tokenizer, delay=SLOW) as h:
        stream = h.stub.GenerateStream(req(PROMPTS[0], 120, ignore_eos=True), timeout=60)
        got = list(next(stream).token_ids)
        stopping = asyncio.run_coroutine_threadsafe(h.server.stop(30), h.loop)
        deadline = time.monotonic() + 10
        while health(h) != NOT_SERVING:  # answered, not UNAVAILABLE: health stays up while draining
            assert time.monotonic() < deadline
            time.sleep(0.01)
        with pytest.raises(grpc.RpcError) as err:
            h.stub.Generate(req(PROMPTS[1], 4), timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "shutting down" in err.value.details()
        msgs = list(stream)
        got += [t for m in msgs for t in m.token_ids]
        assert msgs[-1].finish_reason == pb.FINISH_REASON_LENGTH and len(got) == 120
        assert stopping.result(30) is True
        assert h.sample("hedgerow_requests_total", status="unavailable") == 1


@pytest.mark.live
@pytest.mark.parametrize("how", ["at once", "drain timeout", "second signal"])
def test_a_forced_stop_ends_each_request_with_abort_and_its_tokens(tiny_tokenizer, how):
    with LiveServer(nudged_engine(), tiny_tokenizer, delay=SLOW) as h:
        stream = h.stub.GenerateStream(req(PROMPTS[0], 200, ignore_eos=True), timeout=60)
        unary = h.stub.Generate.future(req(PROMPTS[1], 200, ignore_eos=True), timeout=60)
        got = list(next(stream).token_ids)

        async def stop():
            if how == "at once":
                return await h.server.stop(None)
            if how == "drain timeout":
                return await h.server.stop(0.3)
            force = asyncio.Event()
            asyncio.get_running_loop().call_later(0.3, force.set)
            return await h.server.stop(60, force)

        assert asyncio.run_coroutine_threadsafe(stop(), h.loop).result(30) is False
        msgs = list(stream)
        got += [t for m in msgs for t in m.token_ids]
        assert msgs[-1].finish_reason == pb.FINISH_REASON_ABORT and 0 < len(got) < 200
        assert msgs[-1].usage.completion_tokens == len(got)
        whole = unary.result(30)
        assert whole.finish_reason == pb.FINISH_REASON_ABORT and 0 < len(whole.token_ids) < 200
        assert h.sample("hedgerow_requests_total", status="abort") == 2


class EngineDeath(BaseException):
    """Escapes the engine thread's handling of step failures, as a bug in it would."""


@pytest.mark.live
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_dead_engine_thread_is_unavailable_and_not_serving(tiny_tokenizer):
    engine = nudged_engine()
    step, dying = engine.step, threading.Event()

    def step_or_die():
        if dying.is_set():
            raise EngineDeath("the engine thread dies")
        return step()

    engine.step = step_or_die
    with LiveServer(engine, tiny_tokenizer, delay=SLOW) as h:
        stream = h.stub.GenerateStream(req(PROMPTS[0], 200, ignore_eos=True), timeout=60)
        next(stream)
        dying.set()
        with pytest.raises(grpc.RpcError) as err:
            list(stream)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value.details()
        h.wait_until(lambda: health(h) == NOT_SERVING, "health still SERVING")
        assert h.server.died.is_set()
        with pytest.raises(grpc.RpcError) as err:
            h.stub.Generate(req(PROMPTS[1], 4), timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert h.sample("hedgerow_requests_total", status="error") == 1


@pytest.mark.live
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_serve_exits_1_when_the_engine_thread_dies(tiny_tokenizer, capsys):
    from hedgerow.server.service.metrics import Metrics
    from hedgerow.server.service.serve import _serve

    engine = nudged_engine()

    def dead():
        raise EngineDeath("the engine thread dies at once")

    engine.has_work = dead
    args = argparse.Namespace(host="127.0.0.1", port=0, metrics_host="127.0.0.1", metrics_port=0, drain_timeout=5.0)
    assert asyncio.run(asyncio.wait_for(_serve(args, engine, tiny_tokenizer, ServiceConfig(), Metrics(), None, None),
                                        30)) == 1
    assert "the engine thread stopped" in capsys.readouterr().err


# --- counting ------------------------------------------------------------------------------------
@pytest.mark.live
def test_every_gauge_is_exported_before_the_first_request(tiny_tokenizer):
    with LiveServer(nudged_engine(), tiny_tokenizer) as h:
        value = h.metrics.registry.get_sample_value
        for model in ("target", "draft"):
            assert value("hedgerow_kv_slots_in_use", {"model": model}) == 0
        assert value("hedgerow_running_requests") == 0 and value("hedgerow_waiting_requests") == 0


class SlowDecode:
    """A tokenizer whose decode takes ``seconds``: the handler is still on a request's first message
    when the engine has finished it."""

    def __init__(self, tokenizer, seconds: float):
        self.tokenizer, self.seconds = tokenizer, seconds

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)

    def decode(self, *args, **kw):
        time.sleep(self.seconds)
        return self.tokenizer.decode(*args, **kw)


@pytest.mark.live
def test_a_request_finished_but_never_read_is_counted_by_how_it_ended(tiny_tokenizer):
    with LiveServer(nudged_engine(), SlowDecode(tiny_tokenizer, 0.5)) as h:
        stream = h.stub.GenerateStream(req(PROMPTS[2], 8), timeout=30)
        time.sleep(0.25)  # the engine is done by now; the handler is decoding the first step
        stream.cancel()
        h.wait_until(lambda: h.sample("hedgerow_requests_total", status="length") == 1, "not counted")
        assert h.sample("hedgerow_requests_total", status="cancelled") == 0


# --- access --------------------------------------------------------------------------------------
@pytest.mark.live
def test_an_api_key_guards_every_call_but_health(tiny_folders):
    with text_server(tiny_folders, api_key="sesame") as h:
        refusals = 0
        for metadata in (None, [("authorization", "Bearer wrong")], [("authorization", "sesame")]):
            for call in (lambda md: h.stub.Generate(req("x", 2), timeout=10, metadata=md),
                         lambda md: list(h.stub.GenerateStream(req("x", 2), timeout=10, metadata=md)),
                         lambda md: h.stub.ModelInfo(pb.ModelInfoRequest(), timeout=10, metadata=md)):
                with pytest.raises(grpc.RpcError) as err:
                    call(metadata)
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
                refusals += 1
        good = [("authorization", "Bearer sesame")]
        assert h.stub.Generate(req("x", 2), timeout=30, metadata=good).usage.completion_tokens == 2
        assert h.serving()  # health needs no key
        assert h.sample("hedgerow_requests_total", status="unauthenticated") == refusals


@pytest.mark.live
def test_tls(tiny_folders, tmp_path):
    made = self_signed_certificate(tmp_path)
    if isinstance(made, str):
        pytest.skip(made)
    cert, key = (p.read_bytes() for p in made)
    with text_server(tiny_folders, tls=(cert, key), credentials=grpc.ssl_channel_credentials(cert)) as h:
        assert h.stub.Generate(req("x", 2), timeout=30).usage.completion_tokens == 2
        with grpc.insecure_channel(h.address) as plain:
            with pytest.raises(grpc.RpcError):
                plain.unary_unary("/hedgerow.v1.Generation/ModelInfo")(b"", timeout=5)


@pytest.mark.unit
def test_models_are_named_without_paths(tmp_path):
    from hedgerow.server.embedded import default_pair
    from hedgerow.server.proxy.backend import EMBEDDED_NAME
    from hedgerow.server.service.serve import EMBEDDED_NAMES, served_names

    assert EMBEDDED_NAMES[0] == EMBEDDED_NAME  # the proxy finds the embedded tokenizer by this name
    assert served_names(*default_pair(), None) == EMBEDDED_NAMES
    folder = tmp_path / "my-model"
    folder.mkdir()
    assert served_names(str(folder), None, None) == ("my-model", "")
    assert served_names("Qwen/Qwen2.5-0.5B", str(folder), None) == ("Qwen/Qwen2.5-0.5B", "my-model")
    assert served_names(str(folder), None, "prod") == ("prod", "")
