"""What the gRPC server tests share: the target's own greedy outputs for the tiny prompts, and a
server in process on port 0 (one whose target passes are slowed, so requests are surely in flight)."""

from __future__ import annotations

import pytest

from tests.live import LiveServer
from tests.tiny import PROMPTS, hf_greedy, nudged_engine, tiny_model

N = 24  # new tokens per request
SLOW = 0.02  # seconds added to every target pass of slow_server, so requests are surely in flight


@pytest.fixture(scope="module")
def references():
    target = tiny_model("llama", seed=0)
    return [hf_greedy(target, p, N) for p in PROMPTS]


@pytest.fixture(scope="module")
def server(tiny_tokenizer):
    with LiveServer(nudged_engine(), tiny_tokenizer) as h:
        yield h


@pytest.fixture(scope="module")
def slow_server(tiny_tokenizer):
    with LiveServer(nudged_engine(), tiny_tokenizer, delay=SLOW) as h:
        yield h
