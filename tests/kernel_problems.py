"""Verify-batch problems for the tree-attention kernel tests (emulated and GPU)."""

from __future__ import annotations

import torch

from hedgerow.server.models.kernels import pack_tree_mask, tree_attention_reference

DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}
# ||out - ref|| / ||ref|| against a float64 reference; the output is rounded to its dtype.
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def random_ancestor_mask(n: int, gen: torch.Generator) -> torch.Tensor:
    """[n, n] bool ancestor mask (self included) of a random tree with parent[i] < i."""
    mask = torch.zeros((n, n), dtype=torch.bool)
    for i in range(n):
        if i:
            parent = int(torch.randint(0, i, (1,), generator=gen))
            mask[i] = mask[parent]
        mask[i, i] = True
    return mask


def make_problem(
    *,
    dtype=torch.float32,
    d=64,
    hq=4,
    hkv=2,
    prefix=(37, 0, 70),
    nodes=(5, 9, 1),
    n_max=None,
    num_slots=None,
    max_len=None,
    seed=0,
    device="cpu",
    transposed_q=True,
):
    """A ragged verify batch. Unused cache rows and padding query rows hold NaN, so any read of
    them by the kernel shows up in the output; slots are assigned out of order."""
    gen = torch.Generator().manual_seed(seed)
    batch = len(prefix)
    n_max = n_max or max(nodes)
    num_slots = num_slots or batch + 2
    max_len = max_len or max(p + n for p, n in zip(prefix, nodes)) + 8
    slots = torch.randperm(num_slots, generator=gen)[:batch].to(torch.int32)
    k_cache = torch.full((num_slots, hkv, max_len, d), float("nan"))
    v_cache = torch.full((num_slots, hkv, max_len, d), float("nan"))
    for b in range(batch):
        rows = prefix[b] + nodes[b]
        k_cache[slots[b], :, :rows] = torch.randn((hkv, rows, d), generator=gen)
        v_cache[slots[b], :, :rows] = torch.randn((hkv, rows, d), generator=gen)
    mask = torch.zeros((batch, n_max, n_max), dtype=torch.bool)
    for b in range(batch):
        mask[b, : nodes[b], : nodes[b]] = random_ancestor_mask(nodes[b], gen)
    q = torch.randn((batch, n_max, hq, d), generator=gen)
    for b in range(batch):
        q[b, nodes[b]:] = float("nan")
    # transformers hands attention a transposed view: [B, Hq, N, D] with strides of [B, N, Hq, D].
    q = q.transpose(1, 2) if transposed_q else q.transpose(1, 2).contiguous()
    return dict(
        q=q.to(device=device, dtype=dtype),
        k_cache=k_cache.to(device=device, dtype=dtype),
        v_cache=v_cache.to(device=device, dtype=dtype),
        slots=slots.to(device),
        prefix_lens=torch.tensor(prefix, dtype=torch.int32, device=device),
        num_nodes=torch.tensor(nodes, dtype=torch.int32, device=device),
        tree_mask_bits=pack_tree_mask(mask.to(device)),
        mask=mask,
    )


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref.double()).norm() / ref.double().norm())


def call_args(p):
    return {k: v for k, v in p.items() if k != "mask"}


def reference64(p, **kw):
    """The reference on float64 copies of q and the caches: unrounded ground truth."""
    args = call_args(p)
    for key in ("q", "k_cache", "v_cache"):
        args[key] = args[key].double()
    return tree_attention_reference(**args, **kw, compute_dtype=torch.float64)
