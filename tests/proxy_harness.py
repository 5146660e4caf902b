"""The live setup the proxy tests share: a gRPC server in-process on a free port (tiny random Llama
pair with a real byte-level BPE tokenizer), proxies on free ports in uvicorn threads, driven by the
official ``openai`` client (and raw HTTP where the client would hide what is sent).

The tests are in test_proxy_api.py (answers) and test_proxy_errors.py (refusals, the server or the
client gone); each imports the fixtures it uses from here, module-scoped: one gRPC server and one
proxy per test module.
"""

from __future__ import annotations

import threading
import time

import httpx
import pytest

openai = pytest.importorskip("openai", reason="the proxy tests drive the official client: pip install openai")
pytest.importorskip("fastapi", reason="the proxy needs fastapi and uvicorn")
uvicorn = pytest.importorskip("uvicorn", reason="the proxy needs fastapi and uvicorn")

from hedgerow.server.engine.engine import Engine, EngineConfig  # noqa: E402
from hedgerow.server.service.grpc_service import ServiceConfig  # noqa: E402
from hedgerow.server.models.loader import load_pair  # noqa: E402
from hedgerow.server.proxy.app import create_app  # noqa: E402
from hedgerow.server.proxy.cli import listen  # noqa: E402
from hedgerow.server.proxy.config import ProxyConfig  # noqa: E402
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
