"""Attention over the slot KV cache: the plan of one forward pass, and the backends.

A model (native or transformers) computes q, k, v for the N new tokens of each sequence; the
runner's ``Attend`` writes k, v into the slot cache and calls a backend with the layer's slot
storage and the pass's ``ForwardPlan``. The plan is the one channel through which a pass learns
where to write and what to read: an explicit argument, all tensors, built once per pass.

Backends:
- ``reference``: PyTorch SDPA with the plan's boolean mask; CPU and GPU; the ground truth in tests.
- ``cuda``: the tree-attention kernel of cuda/ through cuda-python (server/models/kernels). It
  reads each sequence's rows in place. Blocks whose earlier rows are only partly visible (a
  drafter's tree levels) take the reference path. Compile-checked, not yet validated on a GPU:
  ``auto`` therefore still picks ``reference``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class TreeKernelPlan:
    """What the CUDA kernel needs: each sequence's fully visible prefix, then its own tree."""

    prefix_lens: torch.Tensor  # [B] int32: fully visible rows per sequence
    num_nodes: torch.Tensor  # [B] int32: tree nodes per sequence
    tree_bits: torch.Tensor  # [B, N, ceil(N/32)] int32: the ancestor bitmask


@dataclass(frozen=True)
class ForwardPlan:
    write_slots: torch.Tensor  # [B, N] slot of each new token (the scratch slot for padding)
    write_rows: torch.Tensor  # [B, N] row of each new token
    read_slots: torch.Tensor  # [B] the slot each batch row attends over
    mask: torch.Tensor  # [B, 1, N, K] bool: query i may see row k; rows [0, K) are read
    read_range: tuple[int, int] | None = None  # (first, last + 1) when read_slots is a contiguous run: a view, no gather
    tree: TreeKernelPlan | None = None  # set when the pass has the kernel's shape and the backend is cuda

    @property
    def kv_len(self) -> int:
        return self.mask.shape[-1]


Backend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, ForwardPlan, float], torch.Tensor]


def reference_attention(
    q: torch.Tensor,  # [B, N, Hq, D]
    keys: torch.Tensor,  # [S, Hkv, L, D] the layer's slot storage
    values: torch.Tensor,  # [S, Hkv, L, D]
    plan: ForwardPlan,
    scale: float,
) -> torch.Tensor:  # [B, N, Hq, D]
    n = plan.kv_len
    if plan.read_range is not None:
        lo, hi = plan.read_range
        k, v = keys[lo:hi, :, :n], values[lo:hi, :, :n]
    else:
        k, v = keys[plan.read_slots, :, :n], values[plan.read_slots, :, :n]
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k, v, attn_mask=plan.mask, scale=scale, enable_gqa=bool(q.shape[2] != k.shape[1])
    )
    return out.transpose(1, 2)


def cuda_attention(q, keys, values, plan: ForwardPlan, scale: float) -> torch.Tensor:
    if plan.tree is None:
        return reference_attention(q, keys, values, plan, scale)
    from hedgerow.server.models import kernels

    t = plan.tree
    return kernels.tree_attention(
        q.transpose(1, 2), keys, values, plan.read_slots, t.prefix_lens, t.num_nodes, t.tree_bits, scale
    )


BACKENDS: dict[str, Backend] = {"reference": reference_attention, "cuda": cuda_attention}


def resolve_backend(name: str, device: torch.device) -> str:
    """``auto`` -> reference until the CUDA kernels are validated on a GPU; ``cuda`` needs CUDA
    and cuda-python."""
    if name in ("auto", "reference"):
        return "reference"
    if name != "cuda":
        raise ValueError(f"attention backend must be auto, reference or cuda, got {name!r}")
    if device.type != "cuda":
        raise ValueError(f"attention backend cuda needs a CUDA device, the model is on {device}")
    from hedgerow.server.models import kernels

    if not kernels.is_available():
        raise ValueError("attention backend cuda needs cuda-python and its NVRTC wheel: pip install 'hedgerow[cuda]'")
    return "cuda"
