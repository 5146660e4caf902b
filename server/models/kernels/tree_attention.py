"""Tree attention of a verify step: every tree node attends to its sequence's cached prefix and to
its tree ancestors, computed by the kernels of cuda/tree_attention.cu (a split-K partial kernel,
then a log-sum-exp merge; docs/algorithms.md §5), with a PyTorch reference.

Glossary
--------
B batch · Hq query heads · Hkv kv heads (Hq % Hkv == 0; q head h reads kv head h // (Hq // Hkv))
· D head dim (64 or 128) · Nmax padded tree size · L_b cached prefix rows of sequence b ·
N_b tree nodes of sequence b · slot: the cache index a sequence owns.

KV cache layout (fixed): per layer ``k_cache``, ``v_cache`` of shape ``[num_slots, Hkv, max_len, D]``,
contiguous, fp16 / bf16 / fp32. Sequence b's prefix is rows ``0..L_b-1`` of slot ``slots[b]`` and
its tree nodes' keys/values are already in rows ``L_b..L_b+N_b-1`` when attention runs.

Tree mask: int32 (or uint32) ``[B, Nmax, ceil(Nmax / 32)]`` ancestor bits, see
:func:`~hedgerow.server.models.kernels.masks.pack_tree_mask`. The prefix is visible to every node.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .compile import DTYPE_NAMES, HEAD_DIMS
from .launch import Launcher, launcher_for, sm_count
from .masks import unpack_tree_mask

# Launch geometry shared with cuda/tree_attention.cu (hedgerow_tree_attn::kThreads, kRowsPerBlock,
# kKeyTile).
_ATTN_THREADS = 128
_ATTN_ROWS_PER_BLOCK = 16
_ATTN_WARPS = _ATTN_THREADS // 32
_KEY_TILE = 32
_LOG2E = 1.4426950408889634


def plan_prefix_splits(
    max_prefix: int, base_blocks: int, num_sms: int, min_chunk: int = 256
) -> tuple[int, int]:
    """(chunk, num_prefix_splits) for the split-K prefix part.

    ``base_blocks`` blocks exist per split (row tiles x B x Hkv); aim for about two blocks per
    SM but never fewer than ``min_chunk`` keys per split. Depends only on host-known bounds, so
    the plan, the grid and the workspace are fixed for a CUDA-graph bucket. The kernel's last
    split runs to the true prefix length, so a too-small ``max_prefix`` is still correct.
    """
    if max_prefix <= 0:
        return _KEY_TILE, 1
    want = max(1, -(-2 * num_sms // max(1, base_blocks)))
    chunk = max(min_chunk, -(-max_prefix // want))
    chunk = -(-chunk // _KEY_TILE) * _KEY_TILE
    return chunk, -(-max_prefix // chunk)


def _as_index(t: torch.Tensor, device: torch.device, name: str, shape: tuple) -> torch.Tensor:
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
    return t.to(device=device, dtype=torch.int32).contiguous()


def _aligned(t: torch.Tensor) -> bool:
    size = t.element_size()
    return t.data_ptr() % 16 == 0 and all(
        (s * size) % 16 == 0 for s, n in zip(t.stride()[:-1], t.shape[:-1]) if n > 1
    )


def tree_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    prefix_lens: torch.Tensor,
    num_nodes: torch.Tensor,
    tree_mask_bits: torch.Tensor,
    scale: float | None = None,
    *,
    max_prefix_len: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of every tree node over its sequence's prefix and its tree ancestors (CUDA).

    q ``[B, Hq, Nmax, D]`` (any strides, unit stride on D), caches ``[slots, Hkv, max_len, D]``,
    ``slots``/``prefix_lens``/``num_nodes`` ``[B]`` (int32 on the GPU preferred),
    ``tree_mask_bits`` ``[B, Nmax, ceil(Nmax/32)]`` int32. Returns ``[B, Nmax, Hq, D]`` in q's
    dtype (fp32 accumulation); padding rows (node >= N_b) are zeros. ``scale`` defaults to
    1/sqrt(D). ``max_prefix_len`` is a host-side upper bound on the prefix lengths used to split
    the prefix across blocks (default: max_len, correct but coarse; pass the bucket's bound).
    ``out`` may be given (contiguous, right shape and dtype), e.g. for CUDA graphs.
    """
    return _tree_attention(
        launcher_for(q.device), q, k_cache, v_cache, slots, prefix_lens, num_nodes,
        tree_mask_bits, scale, max_prefix_len=max_prefix_len, out=out, num_sms=sm_count(q.device),
    )


def _tree_attention(
    launch: Launcher,
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    prefix_lens: torch.Tensor,
    num_nodes: torch.Tensor,
    tree_mask_bits: torch.Tensor,
    scale: float | None = None,
    *,
    max_prefix_len: int | None = None,
    out: torch.Tensor | None = None,
    num_sms: int = 132,
    min_chunk: int = 256,
    poison_workspace: bool = False,
) -> torch.Tensor:
    """tree_attention with an explicit launcher (the tests use a CPU emulation of the kernels)."""
    if q.dim() != 4 or k_cache.dim() != 4:
        raise ValueError("q must be [B, Hq, Nmax, D] and k_cache [num_slots, Hkv, max_len, D]")
    batch, hq, n_max, d = q.shape
    num_slots, hkv, max_len, dk = k_cache.shape
    if q.dtype not in DTYPE_NAMES:
        raise ValueError(f"unsupported dtype {q.dtype}; use one of {list(DTYPE_NAMES)}")
    if d not in HEAD_DIMS:
        raise ValueError(f"head dim {d} unsupported; compiled for {HEAD_DIMS}")
    if k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise ValueError(f"q, k_cache, v_cache dtypes differ: {q.dtype}, {k_cache.dtype}, {v_cache.dtype}")
    if dk != d or v_cache.shape != k_cache.shape:
        raise ValueError(f"cache shapes {tuple(k_cache.shape)}, {tuple(v_cache.shape)} do not fit q {tuple(q.shape)}")
    if hkv == 0 or hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of kv heads ({hkv})")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous() and _aligned(k_cache) and _aligned(v_cache)):
        raise ValueError("k_cache and v_cache must be contiguous and 16-byte aligned")
    if not (k_cache.device == v_cache.device == q.device):
        raise ValueError("q and the caches must be on one device")
    words = max(1, -(-n_max // 32))
    if tree_mask_bits.shape != (batch, n_max, words) or tree_mask_bits.dtype not in (torch.int32, torch.uint32):
        raise ValueError(
            f"tree_mask_bits must be int32 [B, Nmax, ceil(Nmax/32)] = {(batch, n_max, words)}, "
            f"got {tree_mask_bits.dtype} {tuple(tree_mask_bits.shape)} (see pack_tree_mask)"
        )
    device = q.device
    if out is None:
        out = torch.empty((batch, n_max, hq, d), dtype=q.dtype, device=device)
    elif out.shape != (batch, n_max, hq, d) or out.dtype != q.dtype or not out.is_contiguous() or out.device != device:
        raise ValueError(f"out must be a contiguous {q.dtype} tensor of shape {(batch, n_max, hq, d)} on {device}")
    if batch == 0 or n_max == 0 or hq == 0:
        return out
    if q.stride(-1) != 1 or not _aligned(q):
        q = q.contiguous()
    slots_i = _as_index(slots, device, "slots", (batch,))
    prefix_i = _as_index(prefix_lens, device, "prefix_lens", (batch,))
    nodes_i = _as_index(num_nodes, device, "num_nodes", (batch,))
    bits = tree_mask_bits.to(device).contiguous()

    group = hq // hkv
    row_tiles = -(-group * n_max // _ATTN_ROWS_PER_BLOCK)
    bound = max_len if max_prefix_len is None else min(int(max_prefix_len), max_len)
    chunk, n_prefix = plan_prefix_splits(bound, row_tiles * batch * hkv, num_sms, min_chunk)
    s_tot = n_prefix + 1
    if batch * hkv > 65535 or s_tot > 65535:
        raise ValueError("batch * kv heads and the split count must fit a grid dimension (65535)")
    o_part = torch.empty((batch, hq, n_max, s_tot, d), dtype=torch.float32, device=device)
    lse_part = torch.empty((batch, hq, n_max, s_tot), dtype=torch.float32, device=device)
    if poison_workspace:  # tests: the merge must never read a partial that no block wrote
        o_part.fill_(float("nan"))
        lse_part.fill_(float("nan"))
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)

    i32, i64 = np.int32, np.int64
    tname = DTYPE_NAMES[q.dtype]
    launch(
        "tree_attention",
        f"hedgerow_tree_attn_partial_{tname}_d{d}",
        (row_tiles, s_tot, batch * hkv),
        _ATTN_THREADS,
        [
            q.data_ptr(), i64(q.stride(0)), i64(q.stride(1)), i64(q.stride(2)),
            k_cache.data_ptr(), v_cache.data_ptr(),
            slots_i.data_ptr(), prefix_i.data_ptr(), nodes_i.data_ptr(), bits.data_ptr(),
            o_part.data_ptr(), lse_part.data_ptr(),
            i32(num_slots), i32(hq), i32(hkv), i32(max_len), i32(n_max), i32(words),
            i32(chunk), i32(n_prefix), np.float32(scale * _LOG2E),
        ],
    )
    launch(
        "tree_attention",
        f"hedgerow_tree_attn_merge_{tname}_d{d}",
        (-(-n_max * hq // _ATTN_WARPS), batch, 1),
        _ATTN_THREADS,
        [
            o_part.data_ptr(), lse_part.data_ptr(), out.data_ptr(),
            slots_i.data_ptr(), prefix_i.data_ptr(), nodes_i.data_ptr(),
            i32(num_slots), i32(hq), i32(max_len), i32(n_max), i32(chunk), i32(n_prefix),
        ],
    )
    return out


def tree_attention_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    prefix_lens: torch.Tensor,
    num_nodes: torch.Tensor,
    tree_mask_bits: torch.Tensor,
    scale: float | None = None,
    *,
    compute_dtype: torch.dtype = torch.float32,
    **_ignored: Any,
) -> torch.Tensor:
    """PyTorch reference of :func:`tree_attention` (same arguments, any device; syncs).

    Per sequence: gather the slot's rows 0..L+N-1, build the dense ``[N, L+N]`` bool mask
    (prefix columns all visible, tree columns from the bitmask) and run SDPA in
    ``compute_dtype``. Padding rows, and rows that see no key at all, are zeros (as in the kernel).
    """
    batch, hq, n_max, d = q.shape
    hkv = k_cache.shape[1]
    group = hq // hkv
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    mask = unpack_tree_mask(tree_mask_bits, n_max)  # [B, Nmax, Nmax]
    out = torch.zeros((batch, n_max, hq, d), dtype=q.dtype, device=q.device)
    for b, (slot, plen, n) in enumerate(zip(slots.tolist(), prefix_lens.tolist(), num_nodes.tolist())):
        if n <= 0:
            continue
        if not (0 <= slot < k_cache.shape[0] and n <= n_max and 0 <= plen and plen + n <= k_cache.shape[2]):
            raise ValueError(f"sequence {b}: slot {slot}, prefix {plen}, nodes {n} do not fit the cache")
        keys = k_cache[slot, :, : plen + n].to(compute_dtype).repeat_interleave(group, 0)  # [Hq, L+N, D]
        vals = v_cache[slot, :, : plen + n].to(compute_dtype).repeat_interleave(group, 0)
        visible = torch.ones((n, plen + n), dtype=torch.bool, device=q.device)
        visible[:, plen:] = mask[b, :n, :n]
        o = F.scaled_dot_product_attention(
            q[b, :, :n].to(compute_dtype), keys, vals, attn_mask=visible, scale=scale
        )  # [Hq, N, D]
        o = torch.where(visible.any(-1)[None, :, None], o, torch.zeros((), dtype=o.dtype, device=o.device))
        out[b, :n] = o.transpose(0, 1).to(q.dtype)
    return out
