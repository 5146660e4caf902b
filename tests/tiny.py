"""Tiny random models built from configs (no downloads) for engine and server tests, the engine
tests' variants and their tiers, and a clock for engines whose decisions depend on time."""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from hedgerow.drafting.spec import SpecMode, SpecParams
from hedgerow.server.engine.config import EngineConfig
from hedgerow.server.engine.engine import Engine
from hedgerow.server.engine.runner import ModelRunner
from hedgerow.server.engine.sequence import Request
from hedgerow.server.models.hf import TransformersModel
from hedgerow.server.models.native import from_transformers
from hedgerow.verify.sampling import SamplingParams

VOCAB = 128
EOS = 1
PROMPTS = [[5, 6, 7, 8, 9], [10, 11], [3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13], [40]]  # ragged token prompts


def tiny_model(arch: str = "llama", *, seed: int = 0, layers: int = 2, hidden: int = 64,
               dtype: torch.dtype = torch.float64, init_range: float = 0.2):
    """A random model; a wide init gives peaked distributions, so argmax has clear margins."""
    common = dict(
        vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        initializer_range=init_range, eos_token_id=EOS, bos_token_id=0, pad_token_id=0, tie_word_embeddings=False,
    )
    cls, cfg = (LlamaForCausalLM, LlamaConfig(**common)) if arch == "llama" else (Qwen2ForCausalLM, Qwen2Config(**common))
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    return cls(cfg).to(dtype).eval()


@contextmanager
def transformers_attention(model):
    """Run ``model`` with transformers' own attention (the reference), whatever it was set to."""
    before = model.config._attn_implementation
    model.set_attn_implementation("sdpa")
    try:
        yield model
    finally:
        model.set_attn_implementation(before)


def hf_greedy(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    """The target alone, through transformers' own generate and attention (the reference)."""
    with transformers_attention(model):
        out = model.generate(
            torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=EOS, pad_token_id=0,
        )
    gen = out[0, len(prompt):].tolist()
    return gen[: gen.index(EOS) + 1] if EOS in gen else gen


ARCHS = ("llama", "qwen2")
IMPLS = ("transformers", "native")
# Engine tests run on every (model family, implementation): ``arch`` is a plain argument that a module's
# ``pair`` fixture can take, ``impl`` goes through conftest's fixture. The llama pair on Hedgerow's
# native models is in the engine tier, the other three variants are slow: ``-m "unit or engine"``
# runs every engine test once.
VARIANTS = pytest.mark.parametrize(
    ("arch", "impl"),
    [pytest.param(arch, impl, id=f"{arch}-{impl}",
                  marks=pytest.mark.engine if (arch, impl) == ("llama", "native") else pytest.mark.slow)
     for arch in ARCHS for impl in IMPLS],
    indirect=["impl"], scope="module",
)


def runner(model, *, slots=8, max_len=256, name="model", impl="transformers", **kw) -> ModelRunner:
    """A runner over a transformers model built from a config, driven through transformers'
    modules or through the native twin of its weights; ``kw``: the rest of ModelRunner's options."""
    driven = from_transformers(model, max_len) if impl == "native" else TransformersModel(model)
    return ModelRunner(driven, num_slots=slots, max_len=max_len, name=name, **kw)


class PassClock:
    """An engine clock on which time passes only in model passes: a pass of n tokens (all rows
    together) takes ``a + b * n`` seconds of its model's line, whatever the machine. Calibration fits
    those lines exactly and every step measures what the cost model predicts, so an engine whose
    policy reads the clock decides the same on any machine. ``charge`` the runners before the
    engine is built (it calibrates on construction); engines that verify in a worker thread
    (overlap modes) would make the order of charges, and so the readings, a race.

    The default lines make a draft pass cost 40% of a target pass: drafting pays at the cost
    policy's prior acceptance (0.6), not with a draft that keeps missing."""

    def __init__(self, target=(0.005, 0.0001), draft=(0.002, 0.00005)):
        self.lines = {"target": target, "draft": draft}
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def charge(self, runner: ModelRunner) -> None:
        a, b = self.lines[runner.name]
        forward = runner.forward

        def timed(slots, flat):
            self.now += a + b * int(flat.num_nodes.sum())
            return forward(slots, flat)

        runner.forward = timed
        greedy = runner.greedy_chains

        def timed_greedy(slots, starts, fed, tokens, vocab):
            # the passes a greedy run stands for: the catch-up, then one per later draft token
            self.now += a + b * sum(len(f) for f in fed) + (tokens - 1) * (a + b * len(slots))
            return greedy(slots, starts, fed, tokens, vocab)

        runner.greedy_chains = timed_greedy


def make_engine(target, draft=None, *, mode=SpecMode.CHAIN, gamma=4, slots=8, max_len=256, adaptive="none",
                impl="transformers", clock: PassClock | None = None, **cfg) -> Engine:
    t = runner(target, slots=slots, max_len=max_len, name="target", impl=impl)
    d = runner(draft, slots=slots, max_len=max_len, name="draft", impl=impl) if draft is not None else None
    config = EngineConfig(max_model_len=max_len, max_batch_size=slots, spec=SpecParams(mode=mode, draft_tokens=gamma), adaptive=adaptive, **cfg)
    timing = {}
    if clock is not None:
        for r in filter(None, (t, d)):
            clock.charge(r)
        timing["clock"] = clock
    return Engine(t, d, eos_token_ids=[EOS], config=config, **timing)


def request(rid, prompt, n=24, sampling=SamplingParams(), spec=None, **kw) -> Request:
    return Request(rid, tuple(prompt), sampling, n, spec, **kw)


def perturbed_copy(model, scale: float = 0.005, seed: int = 5):
    """A draft close to the target: acceptance and rejection both happen often."""
    import copy

    draft = copy.deepcopy(model)
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed)
        for w in draft.parameters():
            w.add_(torch.randn(w.shape, generator=g, dtype=w.dtype) * scale)
    return draft


def nudged_engine(**kw) -> Engine:
    """Fresh instances of the llama target and a draft nudged from it, which accepts about half its
    drafts (a random draft accepts almost nothing and would leave acceptance counters untested),
    drafting a fixed number of tokens (``adaptive="none"``), so counts are exact. Fresh, because
    reference generation (hf_greedy) switches a model's attention implementation, which must never
    happen under a running engine."""
    return make_engine(tiny_model("llama", seed=0), perturbed_copy(tiny_model("llama", seed=0)), **kw)


def last_logits(model, tokens: list[int]) -> torch.Tensor:
    with transformers_attention(model), torch.no_grad():
        return model(torch.tensor([tokens])).logits[0, -1].float()


def exact_joint(model, prompt: list[int], sampling: SamplingParams, length: int) -> dict:
    """The target's own distribution of its first ``length`` sampled tokens (enumerated)."""
    from hedgerow.verify.sampling import warp_probs

    out = {(): 1.0}
    for _ in range(length):
        nxt = {}
        for prefix, pr in out.items():
            p = warp_probs(last_logits(model, prompt + list(prefix)), sampling)
            for x in torch.nonzero(p).flatten().tolist():
                nxt[prefix + (x,)] = pr * float(p[x])
        out = nxt
    return out


def chi_square_check(samples: list[tuple], want: dict, label: str) -> None:
    """Pearson chi-square against the exact distribution; fails at the 0.001 level."""
    import math

    n = len(samples)
    counts: dict = {}
    for key in samples:
        assert key in want, f"{label}: drew {key}, which has probability 0 under the target"
        counts[key] = counts.get(key, 0) + 1
    chi2 = sum((counts.get(k, 0) - n * p) ** 2 / (n * p) for k, p in want.items())
    dof = len(want) - 1
    limit = dof * (1 - 2 / (9 * dof) + 3.09 * math.sqrt(2 / (9 * dof))) ** 3  # Wilson-Hilferty, p = 0.001
    assert chi2 < limit, f"{label}: chi2 {chi2:.1f} over {dof} dof exceeds {limit:.1f}"
