"""The live harness every live test uses: Hedgerow's gRPC service in process on its own event-loop
thread with sync clients (and its /metrics over HTTP on request), and the OpenAI-compatible proxy in
uvicorn in front of it; both on free ports. Also: a throwaway self-signed certificate for the TLS
tests, and a process's memory as /proc reports it."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import httpx
import uvicorn
from grpc_health.v1 import health_pb2, health_pb2_grpc

from hedgerow.drafting.spec import SpecParams
from hedgerow.server.engine.config import EngineConfig
from hedgerow.server.engine.engine import Engine
from hedgerow.server.engine.runner import ModelRunner
from hedgerow.server.models.loader import load_pair
from hedgerow.server.proxy.app import create_app
from hedgerow.server.proxy.cli import listen
from hedgerow.server.proxy.config import ProxyConfig
from hedgerow.server.rpc import generation_pb2 as pb
from hedgerow.server.rpc import generation_pb2_grpc as pb_grpc
from hedgerow.server.service.grpc_service import ServiceConfig, start_server
from hedgerow.server.service.metrics import Metrics


def req(prompt, n=24, *, rid="", mode=None, stop=(), ignore_eos=False, **sampling) -> pb.GenerateRequest:
    """A GenerateRequest of a text or token-id prompt, ``n`` new tokens at most."""
    msg = pb.GenerateRequest(request_id=rid, stopping=pb.StoppingCriteria(max_new_tokens=n, stop=list(stop),
                                                                         ignore_eos=ignore_eos))
    if isinstance(prompt, str):
        msg.prompt = prompt
    else:
        msg.prompt_token_ids.extend(prompt)
    if mode is not None:
        msg.speculation.mode = mode
    for k, v in sampling.items():
        setattr(msg.sampling, k, v)
    return msg


class LiveServer:
    """``engine`` served over gRPC on ``port`` (0: a free one). ``delay``: seconds added to every target
    pass (settable at any time), so that requests are surely in flight when a test cancels them.
    ``credentials``: the client channel's, for a server started with ``tls``; ``service``: the rest of
    ``start_server``'s arguments (config, api_key, tls)."""

    def __init__(self, engine, tokenizer, *, delay: float = 0.0, metrics: Metrics | None = None, port: int = 0,
                 credentials=None, **service):
        self.delay = delay
        forward = engine.target.forward

        def delayed(slots, flat):
            if self.delay:
                time.sleep(self.delay)
            return forward(slots, flat)

        engine.target.forward = delayed
        self.tokenizer = tokenizer
        self.metrics = metrics or Metrics()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = self._run(start_server(engine, tokenizer, port=port, metrics=self.metrics, **service))
        self.address = f"127.0.0.1:{self.server.port}"
        self.channel = (grpc.secure_channel(self.address, credentials) if credentials is not None
                        else grpc.insecure_channel(self.address))
        self.stub = pb_grpc.GenerationStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)
        self._http = None

    def _run(self, coro, timeout=60):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def serve_metrics(self) -> int:
        """Serve /metrics over HTTP on a free port (until ``close``); returns the port."""
        if self._http is None:
            self._http = self.metrics.serve(0, "127.0.0.1")
        return self._http.server_port

    def serving(self) -> bool:
        for service in ("", "hedgerow.v1.Generation"):
            reply = self.health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            if reply.status != health_pb2.HealthCheckResponse.SERVING:
                return False
        return True

    def engine_state(self) -> tuple[int, int, int, int]:
        """(target KV slots in use, draft KV slots in use, running, waiting), read on the engine thread."""
        def read(e):
            return (e.target.cache.slots_in_use, e.draft.cache.slots_in_use if e.draft else 0,
                    len(e.scheduler.running), len(e.scheduler.waiting))
        return self.server.engine.call(read)

    def sample(self, name: str, **labels) -> float:
        """The sum of the samples of ``name`` whose labels include ``labels`` (as PromQL's ``sum``
        would: ``hedgerow_spec_draft_tokens_total`` alone sums its ``proposer`` labels)."""
        return sum(s.value for metric in self.metrics.registry.collect() for s in metric.samples
                   if s.name == name and labels.items() <= s.labels.items())

    def wait_until(self, check, what: str, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while not check():
            assert time.monotonic() < deadline, f"{what}: slots/running/waiting still {self.engine_state()}"
            time.sleep(0.02)

    def wait_idle(self, timeout: float = 20.0) -> None:
        self.wait_until(lambda: self.engine_state() == (0, 0, 0, 0), "still busy", timeout)

    def close(self) -> None:
        self.channel.close()
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
        self._run(self.server.stop(None))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    def __enter__(self) -> LiveServer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


TEXT_PROMPTS = ["def fibonacci(n):", "import os\n", "for i in range(10):"]  # for text_server


def text_server(folders, **live) -> LiveServer:
    """A server of the tiny pair saved as Hugging Face folders (conftest's ``tiny_folders``), whose
    byte-level BPE tokenizer takes text prompts and stop strings: 3 draft tokens per step. ``live``:
    LiveServer's options (port, api_key, tls, ...)."""
    pair = load_pair(str(folders["target"]), str(folders["draft"]))
    config = EngineConfig(max_model_len=128, max_batch_size=4, adaptive="none", spec=SpecParams(draft_tokens=3))
    engine = Engine(ModelRunner(pair.target, num_slots=4, max_len=128),
                    ModelRunner(pair.draft, num_slots=4, max_len=128),
                    eos_token_ids=[pair.tokenizer.eos_token_id], config=config)
    service = ServiceConfig(target_name=str(folders["target"]), draft_name=str(folders["draft"]))
    return LiveServer(engine, pair.tokenizer, config=live.pop("config", service), **live)


class LiveProxy:
    """The proxy app (``hedgerow proxy``) in uvicorn on a free port, in a thread, in front of the
    gRPC server at ``grpc_target``; ``config``: the rest of ProxyConfig."""

    def __init__(self, grpc_target: str, **config):
        sock = listen("127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        app = create_app(ProxyConfig(grpc_target=grpc_target, **config))
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "the proxy did not start"
            time.sleep(0.01)

    def client(self, key="none", **kw):
        """The official ``openai`` client, pointed at the proxy."""
        import openai

        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=60, **kw)

    def post(self, path: str, body: dict, **kw) -> httpx.Response:
        return httpx.post(self.url + path, json=body, timeout=60, **kw)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(20)

    def __enter__(self) -> LiveProxy:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class ProxyProcess:
    """``hedgerow proxy`` as a process of its own (``add_arguments`` and ``run``, as the CLI wires them),
    for what needs one: its memory, its signals, its TLS. ``flags``: its command line; ``env``: added
    to the environment."""

    SCRIPT = ("import argparse, sys; from hedgerow.server.proxy import cli as proxy; p = argparse.ArgumentParser(); "
              "proxy.add_arguments(p); sys.exit(proxy.run(p.parse_args(sys.argv[1:])))")

    def __init__(self, *flags: str, env: dict[str, str] | None = None):
        self.proc = subprocess.Popen([sys.executable, "-c", self.SCRIPT, "--port", "0", *flags], text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, **(env or {})})
        line = self.proc.stdout.readline()
        ready = re.fullmatch(r"hedgerow: OpenAI API on (https?)://127\.0\.0\.1:(\d+)/v1, gRPC server .*\n", line)
        if not ready:
            self.close()
            raise AssertionError(f"the proxy did not start: {line!r} {self.proc.stderr.read()}")
        self.url = f"{ready[1]}://127.0.0.1:{ready[2]}"
        self.port = int(ready[2])

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> ProxyProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def self_signed_certificate(folder: Path) -> tuple[Path, Path] | str:
    """A throwaway certificate for localhost and 127.0.0.1 and its key (cert.pem, key.pem in
    ``folder``), made with the ``cryptography`` package when it is installed, else with the
    ``openssl`` command; without either, the reason a TLS test must skip."""
    cert, key = folder / "cert.pem", folder / "key.pem"
    try:
        import cryptography  # noqa: F401
    except ImportError:
        openssl = shutil.which("openssl")
        if openssl is None:
            return "neither the cryptography package nor the openssl command is installed"
        subprocess.run([openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                        "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=localhost",
                        "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"], check=True, capture_output=True)
        return cert, key
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    private = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    alt = x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    certificate = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(private.public_key())
                   .serial_number(x509.random_serial_number()).not_valid_before(now)
                   .not_valid_after(now + datetime.timedelta(days=1)).add_extension(alt, critical=False)
                   .sign(private, hashes.SHA256()))
    cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key.write_bytes(private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    return cert, key


class FailedCall(grpc.aio.AioRpcError):
    """A failed gRPC call with a given status and details, as the proxy's error mapping sees one."""

    def __init__(self, code: grpc.StatusCode, details: str):
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (the peak) of a process, in KiB, from /proc/PID/status."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0])
    return out
