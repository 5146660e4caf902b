import logging
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

from tests.tiny import IMPLS  # noqa: E402

# Tiny test models are dominated by per-op overhead: one thread is faster and steadier than an
# OpenMP team competing with the test's own server threads on a 2-core machine.
torch.set_num_threads(1)

TEXT = [
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
    "for i in range(10):\n    print(i * i)\n",
    "class Stack:\n    def __init__(self):\n        self.items = []\n",
    "import os\nimport sys\n\nprint(os.getcwd(), sys.argv)\n",
]


def save_tiny_pair(folder: Path, *, vocab_size: int = 300, seed: int = 0, corpus=TEXT) -> Path:
    """A byte-level BPE tokenizer and a tiny random Llama saved as a Hugging Face folder."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(corpus * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    cfg = LlamaConfig(
        vocab_size=len(fast), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, eos_token_id=fast.eos_token_id,
        bos_token_id=fast.bos_token_id, initializer_range=0.2,
    )
    torch.manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_folders(tmp_path_factory):
    base = tmp_path_factory.mktemp("models")
    return {
        "target": save_tiny_pair(base / "target", seed=0),
        "draft": save_tiny_pair(base / "draft", seed=1),
        "other": save_tiny_pair(base / "other", vocab_size=280, seed=2, corpus=TEXT[::-1] + ["x = 1\n"]),
    }


@pytest.fixture(autouse=True)
def hedgerow_log_handler_per_test():
    """``hedgerow.server.cli.main`` gives the "hedgerow" logger a handler on the sys.stderr of the
    moment, which in a test is that test's capture, closed after it: each test starts without one."""
    yield
    logging.getLogger("hedgerow").handlers.clear()


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_folders):
    """The tiny pair's byte-level BPE tokenizer: it decodes any id of tiny.py's 128-token models
    (to bytes, mostly), so a live server of those models can stream text."""
    from hedgerow.server.models.loader import load_tokenizer

    return load_tokenizer(str(tiny_folders["target"]), "target")


@pytest.fixture(params=IMPLS)
def impl(request):
    """The model implementation an engine test runs on: transformers' modules or Hedgerow's own
    (tiny.VARIANTS parametrizes it where the two belong to different tiers)."""
    return request.param


# --- the proxy tests' live setup: one gRPC server of the tiny folder pair and one proxy per module -
# (tests.live imports the serving stack, fastapi included: only the tests that use it pay for it)
@pytest.fixture(scope="module")
def backend(tiny_folders):
    from tests.live import text_server

    with text_server(tiny_folders) as server:
        yield server


@pytest.fixture(scope="module")
def proxy(backend):
    from tests.live import LiveProxy

    with LiveProxy(backend.address) as p:
        yield p


@pytest.fixture(scope="module")
def client(proxy):
    return proxy.client()


CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")


@pytest.fixture(scope="session")
def chat_tokenizer(tiny_folders, tmp_path_factory):
    """A folder with a copy of the tiny tokenizer and a chat template (``CHAT_TEMPLATE``), for
    proxies that serve chat."""
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("chat-tokenizer")
    tok = AutoTokenizer.from_pretrained(str(tiny_folders["target"]))
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def model(backend):
    """The served model's name, as the proxy lists it."""
    from hedgerow.server.rpc import generation_pb2 as pb

    return backend.stub.ModelInfo(pb.ModelInfoRequest(), timeout=10).target


# --- tiers ---------------------------------------------------------------------------------------
TIERS = ("unit", "engine", "live", "slow", "gpu")  # registered in pyproject.toml


def pytest_collection_modifyitems(config, items):
    """Every test has exactly one tier: the tiers partition the suite, so that ``-m "unit or engine"``
    and the like select what they name and nothing else."""
    wrong = []
    for item in items:
        found = sorted({m.name for m in item.iter_markers()} & set(TIERS))
        if len(found) != 1:
            wrong.append(f"{item.nodeid}: {', '.join(found) or 'no tier'}")
    if wrong:
        raise pytest.UsageError(f"every test needs exactly one tier marker of {', '.join(TIERS)}:\n  "
                                + "\n  ".join(wrong))
