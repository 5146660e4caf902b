"""Tree attention as a registered transformers attention function.

Hedgerow owns the KV cache and the mask: the model is loaded with ``attn_implementation`` set to
one of the names below, every forward gets a 4-D boolean mask ``[B, 1, N, K]`` built by
``verify.flatten`` (transformers passes a 4-D mask through untouched) and ``position_ids`` equal to
``prefix_len + depth`` (siblings share a position). The cache's ``update`` has already written the
block's keys and values and hands back the sequence's keys ``[B, Hkv, K, D]``.

Backends:
- ``reference``: PyTorch SDPA with the boolean mask; CPU and GPU; the ground truth in tests.
- ``cuda``: the kernels of cuda/ through cuda-python (verify/cuda_kernels.py). The cache hands
  back its raw slot storage and the kernel reads each sequence's rows in place. Blocks whose
  earlier rows are only partly visible (a drafter's tree levels) take the reference path.
  Compile-checked, not yet validated on a GPU: ``auto`` therefore still picks ``reference``.

The runner's per-forward plan (slots, prefix lengths, tree sizes) reaches the attention function
through ``forward_plan`` (a thread-local: transformers 5.x drops unknown forward kwargs, and the
draft and the target may run in different threads).
"""

from __future__ import annotations

import threading
from contextlib import contextmanager

import torch
import torch.nn.functional as F

REFERENCE = "hedgerow_reference"
CUDA = "hedgerow_cuda"
BACKENDS = {"reference": REFERENCE, "cuda": CUDA}

_local = threading.local()


@contextmanager
def forward_plan(plan):
    """Make ``plan`` visible to the attention functions for one forward in this thread."""
    previous = getattr(_local, "plan", None)
    _local.plan = plan
    try:
        yield
    finally:
        _local.plan = previous


def current_plan():
    return getattr(_local, "plan", None)


def resolve_backend(name: str, device: torch.device) -> str:
    """``auto`` -> reference until the CUDA kernels are validated on a GPU; ``cuda`` needs CUDA
    and cuda-python."""
    if name in ("auto", "reference"):
        return "reference"
    if name != "cuda":
        raise ValueError(f"attention backend must be auto, reference or cuda, got {name!r}")
    if device.type != "cuda":
        raise ValueError(f"attention backend cuda needs a CUDA device, the model is on {device}")
    from hedgerow.server.models import cuda_kernels

    if not cuda_kernels.is_available():
        raise ValueError("attention backend cuda needs cuda-python and its NVRTC wheel: pip install 'hedgerow[cuda]'")
    return "cuda"


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


def cuda_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    plan = current_plan()
    if plan is None or not plan.raw:
        return reference_attention(module, query, key, value, attention_mask, scaling, dropout, **kwargs)
    from hedgerow.server.models import cuda_kernels

    out = cuda_kernels.tree_attention(
        query, key, value, plan.read_slots, plan.prefix_lens, plan.num_nodes, plan.tree_bits,
        scaling if scaling is not None else query.shape[-1] ** -0.5,
    )
    return out, None  # [B, N, Hq, D]


_registered = False


def register() -> None:
    """Register Hedgerow's attention functions with transformers (idempotent)."""
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    for name, fn in ((REFERENCE, reference_attention), (CUDA, cuda_attention)):
        AttentionInterface.register(name, fn)
        AttentionMaskInterface.register(name, sdpa_mask)
    _registered = True
