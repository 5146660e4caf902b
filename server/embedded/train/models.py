"""The pair's models: Llama configurations, their cost per token, and export in Hugging Face format."""

from __future__ import annotations

from pathlib import Path

from hedgerow.server.embedded import CHAT_TEMPLATE


def llama_config(vocab_size, hidden, layers, heads, kv_heads, intermediate, eos_id, max_pos):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_pos,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
        attention_bias=False,
        mlp_bias=False,
    )


def cost_per_token(model) -> dict:
    """Parameter counts and forward FLOPs/token (2*non-embedding params + lm head)."""
    cfg = model.config
    total = sum(p.numel() for p in model.parameters())
    emb = cfg.vocab_size * cfg.hidden_size
    non_emb = total - emb - (0 if cfg.tie_word_embeddings else emb)
    head = cfg.vocab_size * cfg.hidden_size
    return {
        "params_total": total,
        "params_embedding": emb,
        "params_non_embedding": non_emb,
        "flops_per_token": 2 * (non_emb + head),
        # attention score/value FLOPs per token per context position
        "attn_flops_per_token_per_ctx": 4 * cfg.num_hidden_layers * cfg.hidden_size,
    }


def export_model(model, tok, path: Path, dtype_name: str = "bfloat16") -> None:
    """Write a copy of ``model`` (in ``dtype_name``) and the tokenizer files to ``path``."""
    import copy

    import torch
    from transformers import GenerationConfig

    path.mkdir(parents=True, exist_ok=True)
    m = copy.deepcopy(model).to(getattr(torch, dtype_name)).eval()
    m.generation_config = GenerationConfig(
        bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id,
        do_sample=False,
    )
    m.save_pretrained(path, safe_serialization=True)
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(path, save_jinja_files=False)  # the template inside tokenizer_config.json, as shipped
