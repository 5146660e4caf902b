"""What the native model needs to know, read from a transformers config, or a refusal.

``native_config`` accepts only what ``NativeCausalLM`` computes exactly as transformers does. Any
other option raises ``UnsupportedModel`` with the reason, so the caller can fall back to
transformers' own modules instead of serving a model that silently differs.
"""

from __future__ import annotations

from dataclasses import dataclass

# model_type -> the causal-LM class transformers builds for it
ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}
ROPE_TYPES = ("default", "linear", "llama3")


class UnsupportedModel(Exception):
    """The native model cannot run this checkpoint exactly; ``reason`` says why."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class RopeScaling:
    """A scaled RoPE: ``linear`` divides every frequency by ``factor``; ``llama3`` (Llama 3.1+)
    divides the low frequencies, keeps the high ones and blends the band between."""

    kind: str  # "linear" or "llama3"
    factor: float
    low_freq_factor: float = 1.0  # llama3 only
    high_freq_factor: float = 4.0  # llama3 only
    original_max_position_embeddings: int = 8192  # llama3 only


@dataclass(frozen=True)
class NativeConfig:
    architecture: str  # a key of ARCHITECTURES
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: RopeScaling | None  # None: plain RoPE
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool  # Qwen3: per-head RMSNorm of q and k before RoPE
    tie_word_embeddings: bool
    max_position_embeddings: int


def _rope(hf_config) -> tuple[float, RopeScaling | None]:
    params = getattr(hf_config, "rope_parameters", None)
    if not isinstance(params, dict) or "rope_theta" not in params:
        raise UnsupportedModel(f"rope parameters {params!r} are not one flat dict with a rope_theta")
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in ROPE_TYPES:
        raise UnsupportedModel(f"rope_scaling type {kind!r} is not supported natively (only {', '.join(ROPE_TYPES)})")
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise UnsupportedModel(f"partial_rotary_factor {params['partial_rotary_factor']} (RoPE on part of a head)")
    theta = float(params["rope_theta"])
    if kind == "default":
        return theta, None
    if kind == "linear":
        return theta, RopeScaling("linear", float(params["factor"]))
    return theta, RopeScaling(
        "llama3",
        float(params["factor"]),
        float(params["low_freq_factor"]),
        float(params["high_freq_factor"]),
        int(params["original_max_position_embeddings"]),
    )


def native_config(hf_config) -> NativeConfig:
    """The native config of a transformers ``PretrainedConfig``, or ``UnsupportedModel``."""
    model_type = getattr(hf_config, "model_type", None)
    architectures = getattr(hf_config, "architectures", None) or []
    if model_type not in ARCHITECTURES:
        raise UnsupportedModel(
            f"model type {model_type!r} ({', '.join(architectures) or 'no architectures listed'}) has no native "
            f"implementation; supported: {', '.join(ARCHITECTURES)}"
        )
    expected = ARCHITECTURES[model_type]
    if any(arch != expected for arch in architectures):
        raise UnsupportedModel(f"architectures {architectures} of a {model_type} config: only {expected} runs natively")
    if getattr(hf_config, "quantization_config", None):
        raise UnsupportedModel("quantized checkpoints (quantization_config) do not run natively")
    act = getattr(hf_config, "hidden_act", "silu")
    if act != "silu":
        raise UnsupportedModel(f"hidden_act {act!r}: the native MLP is SiLU-gated")
    window = getattr(hf_config, "sliding_window", None)
    if window is not None:
        raise UnsupportedModel(f"sliding_window={window}: the native model attends over the whole context")
    layer_types = set(getattr(hf_config, "layer_types", None) or ["full_attention"])
    if layer_types != {"full_attention"}:
        raise UnsupportedModel(f"layer_types {sorted(layer_types)}: only full attention runs natively")

    heads = hf_config.num_attention_heads
    kv_heads = getattr(hf_config, "num_key_value_heads", None) or heads
    if heads % kv_heads:
        raise UnsupportedModel(f"{heads} query heads do not group evenly over {kv_heads} key/value heads")
    attention_bias = bool(getattr(hf_config, "attention_bias", False))
    theta, scaling = _rope(hf_config)
    return NativeConfig(
        architecture=model_type,
        vocab_size=hf_config.vocab_size,
        hidden_size=hf_config.hidden_size,
        intermediate_size=hf_config.intermediate_size,
        num_layers=hf_config.num_hidden_layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads,
        rms_norm_eps=float(hf_config.rms_norm_eps),
        rope_theta=theta,
        rope_scaling=scaling,
        # Qwen2 always has q/k/v biases and never an o bias; elsewhere attention_bias covers all four
        qkv_bias=model_type == "qwen2" or attention_bias,
        o_bias=model_type != "qwen2" and attention_bias,
        mlp_bias=bool(getattr(hf_config, "mlp_bias", False)),
        qk_norm=model_type == "qwen3",
        tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
        max_position_embeddings=hf_config.max_position_embeddings,
    )
