"""Any causal LM that transformers runs, behind the interface the runner drives.

The runner asks a model for ``forward(tokens, positions, attend) -> hidden`` and
``logits(hidden)``. Here transformers' own modules compute q, k, v (and RoPE, norms, MLPs);
Hedgerow's attention function, registered with transformers under the name ``hedgerow``, hands
them to ``attend``, which the runner passes to the decoder as a keyword argument (transformers
forwards unknown keyword arguments down to the attention function). The decoder runs with no
transformers cache and no transformers mask: the runner's slot cache and ``ForwardPlan`` are the
only KV state and the only mask.
"""

from __future__ import annotations

import torch

ATTENTION = "hedgerow"


def _attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, hedgerow_attend=None, **kwargs):
    """query [B, Hq, N, D], key/value [B, Hkv, N, D] (un-repeated grouped-query heads, RoPE applied)."""
    if hedgerow_attend is None:
        raise RuntimeError("a model set to Hedgerow's attention was called outside Hedgerow's runner")
    out = hedgerow_attend(module.layer_idx, query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), scaling)
    return out, None  # [B, N, Hq, D]


def _no_mask(*args, **kwargs):
    return None  # the mask is the runner's ForwardPlan


_registered = False


def register() -> None:
    """Register Hedgerow's attention with transformers (idempotent)."""
    global _registered
    if not _registered:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface

        AttentionInterface.register(ATTENTION, _attention)
        AttentionMaskInterface.register(ATTENTION, _no_mask)
        _registered = True


class TransformersModel:
    """A transformers ``PreTrainedModel`` for causal LM, driven by the runner."""

    impl = "transformers"

    def __init__(self, model: torch.nn.Module):
        register()
        model.set_attn_implementation(ATTENTION)
        self.model = model.eval()
        cfg = model.config.get_text_config()
        heads = cfg.num_attention_heads
        self.num_layers = cfg.num_hidden_layers
        self.num_kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        self.decoder = model.base_model
        self.lm_head = model.get_output_embeddings()
        self.vocab_size = self.lm_head.weight.shape[0]
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.generation_config = getattr(model, "generation_config", None)  # its EOS ids count as stops
        self.name_or_path = model.name_or_path

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, attend) -> torch.Tensor:
        """tokens, positions [B, N] -> final hidden states [B, N, hidden]."""
        out = self.decoder(input_ids=tokens, position_ids=positions, use_cache=False, hedgerow_attend=attend)
        return out.last_hidden_state

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()
