"""The tree mask as the kernels read it: one bit per (node, tree node) pair, 32 to an int32 word.

``bits[b, i, j // 32]`` bit ``j % 32`` is set <=> node i of sequence b sees tree node j (j an
ancestor of i, or i itself).
"""

from __future__ import annotations

import torch


def pack_tree_mask(mask: torch.Tensor) -> torch.Tensor:
    """bool ``[B, N, N]`` ancestor mask -> int32 ``[B, N, ceil(N/32)]``; bit j%32 of word j//32.

    Runs on the mask's device without a host sync. Example: node 2 with parent 0 has row
    ``[1, 0, 1]``, packed as word ``0b101 = 5``.
    """
    if mask.dim() != 3 or mask.shape[1] != mask.shape[2]:
        raise ValueError(f"tree mask must be [B, N, N], got {tuple(mask.shape)}")
    b, n, _ = mask.shape
    words = max(1, -(-n // 32))
    padded = torch.zeros((b, n, words * 32), dtype=torch.int64, device=mask.device)
    padded[..., :n] = mask.to(torch.int64)
    weights = torch.bitwise_left_shift(
        torch.ones(32, dtype=torch.int64, device=mask.device),
        torch.arange(32, dtype=torch.int64, device=mask.device),
    )
    packed = (padded.view(b, n, words, 32) * weights).sum(-1)  # [B, N, W], 0 .. 2**32-1
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)


def unpack_tree_mask(bits: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_tree_mask`: int32/uint32 ``[B, N, W]`` -> bool ``[B, N, n]``."""
    words = bits.to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(32, dtype=torch.int64, device=bits.device)
    flat = ((words.unsqueeze(-1) >> shifts) & 1).flatten(-2)  # [B, N, W*32]
    return flat[..., :n].bool()
