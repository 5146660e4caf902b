"""Load a Hugging Face checkpoint (config.json + safetensors) into ``NativeCausalLM``.

Each checkpoint tensor is copied straight into its place in the native parameters: q, k and v
into row ranges of the fused qkv weight, gate and up into the fused gate_up weight, Qwen3's
q_norm / k_norm broadcast over their heads. Copying converts dtype and device on the way, one
tensor at a time, so nothing but the model itself is ever held at the target device.

A checkpoint that does not fit its config fails here, naming the tensor: a tensor the native
model has no place for raises ``UnsupportedModel`` (transformers may know what it is for), a
missing or misshapen one ``ValueError``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from hedgerow.server.models.light import light_config
from hedgerow.server.models.native.config import NativeConfig, UnsupportedModel, native_config
from hedgerow.server.models.native.llama import DecoderLayer, NativeCausalLM

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
HUB_FILES = ["config.json", "*.safetensors", INDEX_FILE]

# Hugging Face tensor name -> (where it goes in the native parameters, the shape it must have)
Targets = dict[str, tuple[torch.Tensor, tuple[int, ...]]]


def _layer_targets(prefix: str, layer: DecoderLayer, c: NativeConfig) -> Targets:
    q, kv, inter = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.intermediate_size
    rows = {"q": slice(0, q), "k": slice(q, q + kv), "v": slice(q + kv, q + 2 * kv)}
    t = {
        "input_layernorm.weight": (layer.attn_norm, (c.hidden_size,)),
        "post_attention_layernorm.weight": (layer.mlp_norm, (c.hidden_size,)),
        "self_attn.o_proj.weight": (layer.o_weight, (c.hidden_size, q)),
        "mlp.gate_proj.weight": (layer.gate_up_weight[:inter], (inter, c.hidden_size)),
        "mlp.up_proj.weight": (layer.gate_up_weight[inter:], (inter, c.hidden_size)),
        "mlp.down_proj.weight": (layer.down_weight, (c.hidden_size, inter)),
    }
    for name, r in rows.items():
        t[f"self_attn.{name}_proj.weight"] = (layer.qkv_weight[r], (r.stop - r.start, c.hidden_size))
        if c.qkv_bias:
            t[f"self_attn.{name}_proj.bias"] = (layer.qkv_bias[r], (r.stop - r.start,))
    if c.o_bias:
        t["self_attn.o_proj.bias"] = (layer.o_bias, (c.hidden_size,))
    if c.mlp_bias:
        t["mlp.gate_proj.bias"] = (layer.gate_up_bias[:inter], (inter,))
        t["mlp.up_proj.bias"] = (layer.gate_up_bias[inter:], (inter,))
        t["mlp.down_proj.bias"] = (layer.down_bias, (c.hidden_size,))
    if c.qk_norm:
        t["self_attn.q_norm.weight"] = (layer.qk_norm[: c.num_heads], (c.head_dim,))
        t["self_attn.k_norm.weight"] = (layer.qk_norm[c.num_heads :], (c.head_dim,))
    return {prefix + name: target for name, target in t.items()}


def weight_targets(model: NativeCausalLM) -> Targets:
    c = model.config
    targets = {
        "model.embed_tokens.weight": (model.embed, (c.vocab_size, c.hidden_size)),
        "model.norm.weight": (model.norm, (c.hidden_size,)),
    }
    if not c.tie_word_embeddings:
        targets["lm_head.weight"] = (model.lm_head, (c.vocab_size, c.hidden_size))
    for i, layer in enumerate(model.layers):
        targets.update(_layer_targets(f"model.layers.{i}.", layer, c))
    return targets


def _ignored(name: str, config: NativeConfig) -> bool:
    """Tensors a checkpoint may carry that transformers does not load either: a tied head's copy of
    the embedding, and the RoPE frequencies older checkpoints saved as a buffer."""
    return (name == "lm_head.weight" and config.tie_word_embeddings) or name.endswith("rotary_emb.inv_freq")


def _place(origin: str, name: str, tensor: torch.Tensor, targets: Targets, architecture: str) -> None:
    if name not in targets:
        raise UnsupportedModel(f"{origin}: tensor {name!r} has no place in the native {architecture} model")
    dest, shape = targets[name]
    if tuple(tensor.shape) != shape:
        raise ValueError(f"{origin}: tensor {name!r} has shape {tuple(tensor.shape)}, the config implies {shape}")
    dest.copy_(tensor)


def load_weights(model: NativeCausalLM, files: list[Path]) -> None:
    """Fill every native parameter from the safetensors ``files``."""

    def tensors():
        for file in files:
            with safe_open(file, framework="pt", device="cpu") as f:
                for name in f.keys():
                    yield file.name, name, f.get_tensor(name)

    _fill(model, tensors(), str(files[0].parent))


def _fill(model: NativeCausalLM, tensors, source: str) -> None:
    """Copy (origin, name, tensor) triples into their places; every place must be filled."""
    config = model.config
    targets = weight_targets(model)
    seen: set[str] = set()
    with torch.no_grad():
        for origin, name, tensor in tensors:
            if not _ignored(name, config):
                _place(origin, name, tensor, targets, config.architecture)
                seen.add(name)
    missing = sorted(set(targets) - seen)
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise ValueError(f"checkpoint {source} lacks tensor {missing[0]!r}{more}")


def from_transformers(hf_model: torch.nn.Module, max_positions: int) -> NativeCausalLM:
    """The native twin of a transformers model already in memory (same weights, device and dtype)."""
    config = native_config(hf_model.config)
    param = next(hf_model.parameters())
    model = NativeCausalLM(config, max_positions, device=param.device, dtype=param.dtype)
    _fill(model, (("state_dict", k, v) for k, v in hf_model.state_dict().items()), type(hf_model).__name__)
    return model.eval()


def checkpoint_files(folder: Path) -> list[Path]:
    """The safetensors files of a model folder: the shards its index names, or the single file."""
    index = folder / INDEX_FILE
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / shard for shard in shards]
    if (folder / SINGLE_FILE).is_file():
        return [folder / SINGLE_FILE]
    raise UnsupportedModel(
        f"{folder} has neither {SINGLE_FILE} nor {INDEX_FILE}: only safetensors checkpoints load natively"
    )


def resolve_folder(path: str) -> Path:
    """A local model folder as is; otherwise a hub id, resolved through huggingface_hub's cache
    (which honours HF_HUB_OFFLINE: offline, only what is cached)."""
    local = Path(path).expanduser()
    if local.is_dir():
        return local
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(path, allow_patterns=HUB_FILES))


def load_native(path: str, *, device, dtype, max_positions: int | None = None) -> NativeCausalLM:
    """A ``NativeCausalLM`` from a Hugging Face model folder or hub id, weights at ``dtype`` on
    ``device``. RoPE covers ``max_positions`` (default: the config's max_position_embeddings).

    Raises ``UnsupportedModel`` for what runs only through transformers.
    """
    folder = resolve_folder(path)
    raw = light_config(folder)  # transformers only where it has something to fill in (server/models/light.py)
    if raw is None:
        from transformers import AutoConfig

        raw = AutoConfig.from_pretrained(folder)
    config = native_config(raw)
    files = checkpoint_files(folder)
    model = NativeCausalLM(config, max_positions or config.max_position_embeddings, device=device, dtype=dtype)
    load_weights(model, files)
    return model.eval()
