"""Tree attention as a registered transformers attention function.

Hedgerow owns the KV cache and the mask: the model is loaded with ``attn_implementation`` set to
one of the names below, every forward gets a 4-D boolean mask ``[B, 1, N, K]`` built by
``verify.flatten`` (transformers passes a 4-D mask through untouched) and ``position_ids`` equal to
``prefix_len + depth`` (siblings share a position). The cache's ``update`` has already written the
block's keys and values and hands back the sequence's keys ``[B, Hkv, K, D]``.

Backends:
- ``reference``: PyTorch SDPA with the boolean mask; CPU and GPU; the ground truth in tests.
- ``cuda``: the kernels of cuda/ through cuda-python (verify/cuda_kernels.py), once validated.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

REFERENCE = "hedgerow_reference"
BACKENDS = {"reference": REFERENCE}


def reference_attention(
    module: torch.nn.Module,
    query: torch.Tensor,  # [B, Hq, N, D]
    key: torch.Tensor,  # [B, Hkv, K, D], un-repeated grouped-query heads
    value: torch.Tensor,  # [B, Hkv, K, D]
    attention_mask: torch.Tensor | None,  # [B, 1, N, K] bool: True = may attend
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    if attention_mask is None or attention_mask.dtype != torch.bool:
        raise RuntimeError(
            "Hedgerow attention needs the boolean tree mask built by verify.flatten; "
            "this model was called without it"
        )
    out = F.scaled_dot_product_attention(
        query,
        key,
        value,
        attn_mask=attention_mask,
        scale=scaling,
        enable_gqa=query.shape[1] != key.shape[1],
    )
    return out.transpose(1, 2).contiguous(), None  # [B, N, Hq, D]


_registered = False


def register() -> None:
    """Register Hedgerow's attention functions with transformers (idempotent)."""
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(REFERENCE, reference_attention)
    AttentionMaskInterface.register(REFERENCE, sdpa_mask)
    _registered = True
