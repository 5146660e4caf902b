"""What the parts of ``hedgerow bench gpu`` share: the context a part runs in, its outcome, tiny
random model pairs built from configs (no download), random draft trees, and a device timer.
"""

from __future__ import annotations

import gc
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

VOCAB = 128
EOS = 1
PROMPTS = [[5, 6, 7, 8, 9], [10, 11], [3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13], [40]]  # ragged token prompts


@dataclass
class Context:
    device: torch.device
    deadline: float  # time.monotonic() by which the part should be done
    seed: int = 0

    def left(self) -> float:
        return self.deadline - time.monotonic()


@dataclass
class Outcome:
    status: str  # passed, failed or skipped
    summary: str  # one line, with the figures that decide the status
    figures: dict = field(default_factory=dict)


def verdict(ok: bool, summary: str, **figures) -> Outcome:
    return Outcome("passed" if ok else "failed", summary, figures)


def skipped(reason: str) -> Outcome:
    return Outcome("skipped", reason)


def kernels_missing() -> str | None:
    """Why the CUDA kernels cannot run here, or None when they can."""
    from hedgerow.server.models import kernels

    if kernels.is_available():
        return None
    return 'cuda-python is not importable (pip install cuda-python "cuda-toolkit[nvrtc]==13.*")'


def tiny_pair(arch: str, device, dtype, hidden: int, seed: int = 0) -> tuple:
    """A random transformers target (2 layers) and draft (1 layer) of ``arch`` (llama or qwen2):
    4 query and 2 key/value heads, so hidden 256 gives head dim 64, a size the kernels take; a
    wide initialisation gives peaked distributions, so greedy argmax has clear margins."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    config_cls, model_cls = (LlamaConfig, LlamaForCausalLM) if arch == "llama" else (Qwen2Config, Qwen2ForCausalLM)

    def build(layers: int, model_seed: int):
        cfg = config_cls(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         initializer_range=0.2, eos_token_id=EOS, bos_token_id=0, pad_token_id=0,
                         tie_word_embeddings=False)
        cfg._attn_implementation = "sdpa"  # the reference: transformers' own attention
        torch.manual_seed(model_seed)
        return model_cls(cfg).to(device=device, dtype=dtype).eval()

    return build(2, seed), build(1, seed + 1)


def hf_greedy(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    """The target alone through transformers' own ``generate`` (SDPA attention): the reference."""
    ids = torch.tensor([prompt], device=model.device)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                         eos_token_id=EOS, pad_token_id=0)
    gen = out[0, len(prompt):].tolist()
    return gen[: gen.index(EOS) + 1] if EOS in gen else gen


def random_tree(nodes: int, gen: torch.Generator, vocab: int = VOCAB):
    """A ``DraftTree`` of ``nodes`` random tokens, each node's parent drawn among the earlier nodes."""
    from hedgerow.verify.tree import DraftTree

    parents = [-1] + [int(torch.randint(0, i, (1,), generator=gen)) for i in range(1, nodes)]
    return DraftTree(torch.randint(2, vocab, (nodes,), generator=gen), torch.tensor(parents))


def median_ms(fn: Callable[[], object], device: torch.device, iters: int = 20, warmup: int = 3) -> float:
    """Median milliseconds of ``fn``: CUDA events around each call on a GPU, the wall clock on a CPU."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


def free_memory(device: torch.device) -> None:
    """Give back what a part allocated (large models), before the next part runs."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
