"""Rotary position embedding: one precomputed table, gathered by position at every forward.

The frequencies follow transformers' ``modeling_rope_utils`` operation for operation (float32), so
the table holds the very cos/sin values transformers computes per forward; it is stored at the
model's dtype because transformers casts cos/sin to the activations' dtype before rotating.

Rotation uses transformers' rotate-half convention, ``x * cos + rotate_half(x) * sin`` with
``rotate_half(x) = cat(-x2, x1)``. The table's sine half carries that sign instead,
``[-sin, +sin]``, so the rotation is one ``roll`` (``cat(x2, x1)``) and no negation:
``(-a) * b == a * (-b)`` exactly, so the result is bit-identical.
"""

from __future__ import annotations

import math

import torch

from hedgerow.server.models.native.config import NativeConfig


def inverse_frequencies(config: NativeConfig) -> torch.Tensor:
    """[head_dim / 2] float32, as transformers' default, linear and llama3 RoPE initialisers."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float) / dim))
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq
    if scaling.kind == "linear":
        return inv_freq / scaling.factor
    # llama3: same expression order as transformers' _compute_llama3_parameters
    factor = scaling.factor
    low, high = scaling.low_freq_factor, scaling.high_freq_factor
    old_context = scaling.original_max_position_embeddings
    low_freq_wavelen = old_context / low
    high_freq_wavelen = old_context / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def rope_table(config: NativeConfig, max_positions: int) -> torch.Tensor:
    """[max_positions, 2 * head_dim] float32: ``cos | signed sin`` for every position."""
    inv_freq = inverse_frequencies(config)  # [D/2]
    freqs = torch.arange(max_positions, dtype=torch.int64).float()[:, None] * inv_freq  # [P, D/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [P, D]
    half = config.head_dim // 2
    sin = emb.sin()  # [P, D]
    return torch.cat((emb.cos(), -sin[:, :half], sin[:, half:]), dim=-1)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, N, H, D] rotated by cos / signed sin [B, N, 1, D]."""
    return x * cos + x.roll(x.shape[-1] // 2, -1) * sin
