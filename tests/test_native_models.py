"""The native Llama-family models against transformers, on tiny random models of each family.

Every check runs the native model through a test-side ``Attend`` with its own dense KV cache per
sequence and an explicit boolean mask (the shapes a ragged batch and a token tree produce), and
compares with transformers run on each root-to-node path as a plain sequence.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from hedgerow.server.models.native import UnsupportedModel, load_native, native_config

EMBEDDED = Path(__file__).resolve().parents[1] / "server" / "embedded"
VOCAB = 128
TOL = dict(rtol=1e-5, atol=1e-5)  # float32: attention over a longer masked cache rounds differently
LLAMA3_ROPE = {
    "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
    # small enough that head_dim 16's wavelengths fall in all three bands: kept, blended, divided
    "original_max_position_embeddings": 64,
}
FAMILIES = {
    "llama-gqa": (LlamaConfig, LlamaForCausalLM, {}),
    "llama-tied-mha-bias": (
        LlamaConfig, LlamaForCausalLM,
        dict(num_key_value_heads=4, tie_word_embeddings=True, attention_bias=True, mlp_bias=True),
    ),
    "llama3-rope": (LlamaConfig, LlamaForCausalLM, dict(rope_scaling=LLAMA3_ROPE)),
    "llama-linear-rope": (LlamaConfig, LlamaForCausalLM, dict(rope_scaling={"rope_type": "linear", "factor": 2.0})),
    "mistral-head-dim": (MistralConfig, MistralForCausalLM, dict(sliding_window=None, head_dim=32)),
    "qwen2-tied": (Qwen2Config, Qwen2ForCausalLM, dict(tie_word_embeddings=True)),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, dict(head_dim=32)),
    "qwen3-tied-mqa-bias": (
        Qwen3Config, Qwen3ForCausalLM,
        dict(head_dim=16, num_key_value_heads=1, tie_word_embeddings=True, attention_bias=True),
    ),
}


def tiny_hf(family: str, seed: int = 0):
    config_cls, model_cls, extra = FAMILIES[family]
    config = config_cls(
        **{
            "vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256,
            "initializer_range": 0.2, "tie_word_embeddings": False, **extra,
        }
    )
    torch.manual_seed(seed)
    return model_cls(config).eval()


@pytest.fixture(scope="module", params=list(FAMILIES))
def pair(request, tmp_path_factory):
    hf = tiny_hf(request.param)
    folder = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(folder)
    return hf, load_native(str(folder), device="cpu", dtype=torch.float32)


class DenseAttend:
    """A dense KV cache per sequence, [B, L, Hkv, D] per layer, and an explicit mask [B, N, L]."""

    def __init__(self, model, batch: int, length: int = 64, dtype=torch.float32):
        shape = (batch, length, model.num_kv_heads, model.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype) for _ in range(model.num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype) for _ in range(model.num_layers)]
        self.rows = self.mask = None  # [B, N] cache row of each new token; [B, N, L] bool

    def __call__(self, layer, q, k, v):
        batch = torch.arange(q.shape[0])[:, None]
        self.k[layer][batch, self.rows] = k
        self.v[layer][batch, self.rows] = v
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), self.k[layer].transpose(1, 2), self.v[layer].transpose(1, 2),
            attn_mask=self.mask[:, None], enable_gqa=True,
        )  # [B, Hq, N, D]
        return out.transpose(1, 2)


def run_block(model, attend: DenseAttend, seqs, forward=None) -> list[torch.Tensor]:
    """One pass over a batch of blocks, each ``(prefix_len, tokens, parents)``: node i sits at
    position prefix_len + depth(i), in cache row prefix_len + i, and sees the prefix, itself and
    its ancestors. Padding sits in the cache's last row and sees only itself. ``forward``
    replaces ``model.forward`` (a compiled one). Returns each sequence's logits [n_b, V]."""
    n = max(len(tokens) for _, tokens, _ in seqs)
    length = attend.k[0].shape[1]
    tokens = torch.zeros(len(seqs), n, dtype=torch.long)
    positions = torch.zeros(len(seqs), n, dtype=torch.long)
    rows = torch.full((len(seqs), n), length - 1)
    mask = torch.zeros(len(seqs), n, length, dtype=torch.bool)
    mask[:, :, -1] = True
    for b, (prefix, toks, parents) in enumerate(seqs):
        depth = []
        for i, (tok, parent) in enumerate(zip(toks, parents)):
            depth.append(0 if parent < 0 else depth[parent] + 1)
            tokens[b, i], positions[b, i], rows[b, i] = tok, prefix + depth[i], prefix + i
            mask[b, i, -1] = False
            mask[b, i, :prefix] = True
            node = i
            while node >= 0:
                mask[b, i, prefix + node] = True
                node = parents[node]
    attend.rows, attend.mask = rows, mask
    with torch.inference_mode():
        logits = model.logits((forward or model)(tokens, positions, attend))
    return [logits[b, : len(toks)] for b, (_, toks, _) in enumerate(seqs)]


def chain(tokens):
    return list(range(-1, len(tokens) - 1))


def hf_logits(hf, tokens) -> torch.Tensor:
    """transformers on a plain sequence: logits [T, V]."""
    with torch.inference_mode():
        return hf(torch.tensor([tokens])).logits[0].float()


@pytest.mark.engine
def test_prefill_then_decode(pair):
    hf, model = pair
    torch.manual_seed(1)
    seq = torch.randint(0, VOCAB, (14,)).tolist()
    ref = hf_logits(hf, seq)
    attend = DenseAttend(model, 1)
    (prefill,) = run_block(model, attend, [(0, seq[:9], chain(seq[:9]))])
    torch.testing.assert_close(prefill, ref[:9], **TOL)
    for t in range(9, 14):
        (step,) = run_block(model, attend, [(t, [seq[t]], [-1])])
        torch.testing.assert_close(step[0], ref[t], **TOL)


@pytest.mark.engine
def test_ragged_batch(pair):
    hf, model = pair
    torch.manual_seed(2)
    prompts = [torch.randint(0, VOCAB, (n,)).tolist() for n in (7, 4)]
    attend = DenseAttend(model, 2)
    out = run_block(model, attend, [(0, p, chain(p)) for p in prompts])
    nxt = [5, 9]
    step = run_block(model, attend, [(len(p), [t], [-1]) for p, t in zip(prompts, nxt)])
    for p, t, o, s in zip(prompts, nxt, out, step):
        ref = hf_logits(hf, p + [t])
        torch.testing.assert_close(o, ref[:-1], **TOL)
        torch.testing.assert_close(s[0], ref[-1], **TOL)


@pytest.mark.engine
def test_token_tree(pair):
    """A batch of two trees after ragged prompts; siblings share a position."""
    hf, model = pair
    torch.manual_seed(3)
    prompts = [torch.randint(0, VOCAB, (n,)).tolist() for n in (6, 3)]
    trees = [
        (torch.randint(0, VOCAB, (7,)).tolist(), [-1, 0, 0, 1, 1, 2, 5]),
        (torch.randint(0, VOCAB, (4,)).tolist(), [-1, -1, 0, 1]),  # two roots
    ]
    attend = DenseAttend(model, 2)
    run_block(model, attend, [(0, p, chain(p)) for p in prompts])
    out = run_block(model, attend, [(len(p), toks, parents) for p, (toks, parents) in zip(prompts, trees)])
    for prompt, (toks, parents), logits in zip(prompts, trees, out):
        for i in range(len(toks)):
            path, node = [], i
            while node >= 0:
                path.insert(0, toks[node])
                node = parents[node]
            torch.testing.assert_close(logits[i], hf_logits(hf, prompt + path)[-1], **TOL)


@pytest.mark.engine
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_embedded_pair(dtype):
    torch.manual_seed(4)
    prompt = torch.randint(0, 4096, (24,)).tolist()
    for role in ("target", "draft"):
        hf = AutoModelForCausalLM.from_pretrained(EMBEDDED / role, dtype=dtype).eval()
        model = load_native(str(EMBEDDED / role), device="cpu", dtype=dtype)
        (out,) = run_block(model, DenseAttend(model, 1, dtype=dtype), [(0, prompt, chain(prompt))])
        ref = hf_logits(hf, prompt)
        # float32 to 1e-5; bfloat16 to two of its ulps at the largest logit (bit-identical on a CPU
        # without native bf16, where both run the same emulation; not with AVX512-BF16 kernels)
        bf16 = dict(rtol=0.0, atol=2 * 2**-7 * float(ref.abs().max()))
        torch.testing.assert_close(out, ref, **(TOL if dtype == torch.float32 else bf16))
        assert torch.equal(out.argmax(-1), ref.argmax(-1))


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama-gqa", "qwen3-tied-mqa-bias"])
def test_compiles_fullgraph(family, tmp_path):
    """fullgraph=True fails on any graph break. Backend aot_eager: dynamo's capture plus AOT
    autograd's functionalisation, without inductor's C++ compile (too slow on a 2-core CPU).
    Static shapes, one graph per shape, as CUDA graphs would be captured."""
    hf = tiny_hf(family)
    hf.save_pretrained(tmp_path)
    model = load_native(str(tmp_path), device="cpu", dtype=torch.float32)
    torch._dynamo.reset()
    compiled = torch.compile(model.forward, fullgraph=True, backend="aot_eager", dynamic=False)
    torch.manual_seed(5)
    prompts = [torch.randint(0, VOCAB, (n,)).tolist() for n in (5, 3)]
    decode = [(len(p), [t], [-1]) for p, t in zip(prompts, (7, 8))]  # B=2, N=1
    block = [(len(prompts[0]), [1, 2, 3, 4, 5], [-1, 0, 0, 1, 2])]  # B=1, N=5
    for batch, seqs in ((2, decode), (1, block)):
        eager_attend, compiled_attend = DenseAttend(model, batch), DenseAttend(model, batch)
        for attend in (eager_attend, compiled_attend):
            run_block(model, attend, [(0, p, chain(p)) for p in prompts[:batch]])
        eager = run_block(model, eager_attend, seqs)
        got = run_block(model, compiled_attend, seqs, forward=compiled)
        for e, g in zip(eager, got):
            torch.testing.assert_close(g, e, **TOL)


@pytest.mark.engine
def test_sharded_checkpoint(tmp_path):
    hf = tiny_hf("qwen3")
    hf.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    model = load_native(str(tmp_path), device="cpu", dtype=torch.float32)
    prompt = list(range(10, 22))
    (out,) = run_block(model, DenseAttend(model, 1), [(0, prompt, chain(prompt))])
    torch.testing.assert_close(out, hf_logits(hf, prompt), **TOL)


@pytest.mark.engine
def test_hub_id_from_the_offline_cache(tmp_path, monkeypatch):
    """A hub id resolves through huggingface_hub's cache (HF_HUB_OFFLINE=1 in conftest)."""
    import huggingface_hub.constants

    repo = tmp_path / "models--someone--tiny-qwen2"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    hf = tiny_hf("qwen2-tied")
    hf.save_pretrained(repo / "snapshots" / ("0" * 40))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    model = load_native("someone/tiny-qwen2", device="cpu", dtype=torch.float32)
    prompt = list(range(30, 38))
    (out,) = run_block(model, DenseAttend(model, 1), [(0, prompt, chain(prompt))])
    torch.testing.assert_close(out, hf_logits(hf, prompt), **TOL)
    with pytest.raises(OSError):
        load_native("someone/not-cached", device="cpu", dtype=torch.float32)


@pytest.mark.engine
def test_checkpoint_mismatch_names_the_tensor(tmp_path):
    tiny_hf("llama-gqa").save_pretrained(tmp_path)
    file = tmp_path / "model.safetensors"
    tensors = load_file(file)
    missing = tensors.pop("model.layers.1.mlp.up_proj.weight")
    save_file(tensors, file, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"lacks tensor 'model\.layers\.1\.mlp\.up_proj\.weight'"):
        load_native(str(tmp_path), device="cpu", dtype=torch.float32)
    tensors["model.layers.1.mlp.up_proj.weight"] = missing
    tensors["model.layers.0.mlp.up_proj.bias"] = torch.zeros(96)
    save_file(tensors, file, metadata={"format": "pt"})
    with pytest.raises(UnsupportedModel, match=r"'model\.layers\.0\.mlp\.up_proj\.bias' has no place"):
        load_native(str(tmp_path), device="cpu", dtype=torch.float32)


@pytest.mark.unit
@pytest.mark.parametrize(
    "config, reason",
    [
        (LlamaConfig(rope_scaling={"rope_type": "dynamic", "factor": 2.0}), "rope_scaling type 'dynamic'"),
        (LlamaConfig(rope_scaling={"rope_type": "yarn", "factor": 2.0}), "rope_scaling type 'yarn'"),
        (GPT2Config(), "model type 'gpt2'"),
        (MistralConfig(), "sliding_window=4096"),
        (Qwen2Config(use_sliding_window=True), "sliding_window=4096"),
        (LlamaConfig(hidden_act="gelu"), "hidden_act 'gelu'"),
        (LlamaConfig(architectures=["LlamaForSequenceClassification"]), "only LlamaForCausalLM"),
        (LlamaConfig(quantization_config={"quant_method": "gptq"}), "quantized"),
    ],
)
def test_refuses_what_it_cannot_run_exactly(config, reason):
    with pytest.raises(UnsupportedModel, match=reason):
        native_config(config)


@pytest.mark.unit
def test_accepts_llama3_config():
    config = native_config(LlamaConfig(rope_scaling=LLAMA3_ROPE, head_dim=16))
    assert config.rope_scaling.kind == "llama3" and config.rope_scaling.original_max_position_embeddings == 64
    assert config.head_dim == 16 and not config.qkv_bias and not config.qk_norm
