"""``hedgerow serve`` as a command: draining in-flight requests on SIGTERM (a process of its own),
refusing bad flags, and leaving a core to the gRPC threads on a CPU."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from hedgerow.server.rpc import generation_pb2 as pb
from hedgerow.server.rpc import generation_pb2_grpc as pb_grpc
from tests.live import req


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
