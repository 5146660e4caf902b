"""Model shapes of ``hedgerow bench sweep``: Llama configurations with random weights (no download).

``--target-shape``/``--draft-shape`` take a preset name or ``key=value,...`` over hidden, layers,
heads, kv_heads, intermediate, vocab, tie. Presets: llama-100m / llama-10m (CPU, the defaults),
llama-8b / llama-1b (Llama-3 8B and 1B shapes: use a GPU, ``--device cuda --dtype bfloat16``),
tiny / tiny-draft (tests).
"""

from __future__ import annotations

from dataclasses import dataclass

from hedgerow.server.errors import HedgerowError


@dataclass(frozen=True)
class Shape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tie: bool = False

    def config(self, max_len: int):
        from transformers import LlamaConfig

        cfg = LlamaConfig(
            vocab_size=self.vocab, hidden_size=self.hidden, intermediate_size=self.intermediate,
            num_hidden_layers=self.layers, num_attention_heads=self.heads, num_key_value_heads=self.kv_heads,
            max_position_embeddings=max(max_len, 256), tie_word_embeddings=self.tie,
            bos_token_id=0, eos_token_id=1, pad_token_id=0,
        )
        return cfg

    def params(self) -> int:
        head_dim = self.hidden // self.heads
        attn = self.hidden * head_dim * (2 * self.heads + 2 * self.kv_heads)
        mlp = 3 * self.hidden * self.intermediate
        emb = self.vocab * self.hidden * (1 if self.tie else 2)
        return self.layers * (attn + mlp + 2 * self.hidden) + emb + self.hidden


PRESETS = {
    "llama-100m": Shape(hidden=768, layers=12, heads=12, kv_heads=4, intermediate=2048, vocab=32000),
    "llama-10m": Shape(hidden=256, layers=4, heads=4, kv_heads=2, intermediate=768, vocab=32000, tie=True),
    "llama-8b": Shape(hidden=4096, layers=32, heads=32, kv_heads=8, intermediate=14336, vocab=128256),
    "llama-1b": Shape(hidden=2048, layers=16, heads=32, kv_heads=8, intermediate=8192, vocab=128256, tie=True),
    "tiny": Shape(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vocab=256),
    "tiny-draft": Shape(hidden=32, layers=1, heads=2, kv_heads=1, intermediate=64, vocab=256),
}


def parse_shape(text: str, flag: str) -> Shape:
    if text in PRESETS:
        return PRESETS[text]
    fields = {}
    try:
        for item in text.split(","):
            key, value = item.split("=")
            key = key.strip()
            fields[key] = value.strip().lower() in ("1", "true", "yes") if key == "tie" else int(value)
        shape = Shape(**fields)
    except (ValueError, TypeError):
        raise HedgerowError(f"{flag} {text!r}: a preset ({', '.join(PRESETS)}) or "
                            "hidden=..,layers=..,heads=..,kv_heads=..,intermediate=..,vocab=..[,tie=1]") from None
    if min(shape.hidden, shape.layers, shape.heads, shape.kv_heads, shape.intermediate, shape.vocab) < 1 or \
            shape.hidden % shape.heads or shape.heads % shape.kv_heads:
        raise HedgerowError(f"{flag} {text!r}: sizes must be >= 1, heads divide hidden, kv_heads divide heads")
    return shape


def build_model(shape: Shape, max_len: int, device, dtype, seed: int):
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # initialise in the target dtype: an 8B fp32 copy is 32 GB
    try:
        with torch.device(device):
            model = LlamaForCausalLM(shape.config(max_len))
    finally:
        torch.set_default_dtype(previous)
    return model.eval()
