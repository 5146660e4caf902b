"""Preallocated per-sequence KV cache ("slots"), plugged into transformers as a ``Cache``.

Layout per layer: ``keys, values: [num_slots + 1, kv_heads, max_len, head_dim]``. A sequence owns
one slot; row t holds the KV of its token t. The extra last slot is scratch: padding tokens of a
ragged batch write there, so real slots never see garbage and no write is out of bounds.

Before each forward the runner sets a ``WritePlan``: where each new token's KV goes and which
slots and how many rows the attention reads. ``update`` writes in place (no ``torch.cat``) and
returns a view when the batch's slots are contiguous, a gather otherwise.

After verification the engine keeps the accepted rows with ``compact`` (rows move, in order,
to the end of the committed prefix) and forgets the rest by simply not counting them: the
sequence's length lives in the engine, rows past it are dead and get overwritten.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, CacheLayerMixin


@dataclass
class WritePlan:
    write_slots: torch.Tensor  # [B, N] slot of each new token (scratch slot for padding)
    write_rows: torch.Tensor  # [B, N] row of each new token
    read_slots: torch.Tensor  # [B] the slot each batch row attends over
    read_range: tuple[int, int] | None  # (first, last + 1) when read_slots is a contiguous run
    kv_len: int  # rows [0, kv_len) are read
    raw: bool = False  # hand the attention the raw slot storage (CUDA kernels read rows in place)
    prefix_lens: torch.Tensor | None = None  # [B] int32, with raw: fully visible rows per sequence
    num_nodes: torch.Tensor | None = None  # [B] int32, with raw: tree nodes per sequence
    tree_bits: torch.Tensor | None = None  # [B, N, ceil(N/32)] int32, with raw: the ancestor bitmask


class SlotLayer(CacheLayerMixin):
    is_compileable = False
    is_sliding = False

    def __init__(self, keys: torch.Tensor, values: torch.Tensor):
        super().__init__()
        self.keys, self.values = keys, values
        self.is_initialized = True
        self.plan: WritePlan | None = None

    def lazy_initialization(self, key_states, value_states) -> None:  # preallocated already
        return None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        plan = self.plan
        # key_states: [B, Hkv, N, D] -> rows [B, N, Hkv, D] at (slot, :, row)
        self.keys[plan.write_slots, :, plan.write_rows] = key_states.transpose(1, 2).to(self.keys.dtype)
        self.values[plan.write_slots, :, plan.write_rows] = value_states.transpose(1, 2).to(self.values.dtype)
        if plan.raw:
            return self.keys, self.values
        if plan.read_range is not None:
            lo, hi = plan.read_range
            return self.keys[lo:hi, :, : plan.kv_len], self.values[lo:hi, :, : plan.kv_len]
        return self.keys[plan.read_slots, :, : plan.kv_len], self.values[plan.read_slots, :, : plan.kv_len]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return (self.plan.kv_len if self.plan else query_length), 0

    def get_seq_length(self) -> int:
        return 0  # lengths are per sequence and live in the engine; positions are always passed

    def get_max_length(self) -> int:
        return self.keys.shape[2]


class SlotKVCache(Cache):
    """Every layer's slot storage for one model, plus the free-slot list."""

    def __init__(
        self,
        *,
        num_layers: int,
        num_slots: int,
        max_len: int,
        kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ):
        shape = (num_slots + 1, kv_heads, max_len, head_dim)
        layers = [
            SlotLayer(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
            for _ in range(num_layers)
        ]
        super().__init__(layers=layers)
        self.num_slots = num_slots
        self.max_len = max_len
        self.scratch_slot = num_slots
        self.device = device
        self._free = list(range(num_slots - 1, -1, -1))  # pop() hands out low slots first

    # --- slots -------------------------------------------------------------------------------
    @property
    def slots_in_use(self) -> int:
        return self.num_slots - len(self._free)

    @property
    def free_slots(self) -> int:
        return len(self._free)

    def allocate(self) -> int:
        if not self._free:
            raise RuntimeError("no free KV slot")
        return self._free.pop()

    def release(self, slot: int) -> None:
        if slot in self._free or not 0 <= slot < self.num_slots:
            raise RuntimeError(f"KV slot {slot} released twice or out of range")
        self._free.append(slot)
        self._free.sort(reverse=True)

    def bytes(self) -> int:
        return sum(l.keys.numel() * l.keys.element_size() * 2 for l in self.layers)

    # --- per-forward plan --------------------------------------------------------------------
    def set_plan(self, plan: WritePlan | None) -> None:
        for layer in self.layers:
            layer.plan = plan

    # --- compaction ---------------------------------------------------------------------------
    def compact(self, slots: list[int], src_rows: list[list[int]], dst_start: list[int]) -> None:
        """For each sequence keep rows ``src_rows[i]`` (increasing), moved to ``dst_start[i]``, ...

        Sequences whose rows are already in place (a chain's accepted prefix) cost nothing.
        """
        slot_idx, src_idx, dst_idx = [], [], []
        for slot, src, dst in zip(slots, src_rows, dst_start):
            for j, row in enumerate(src):
                if row != dst + j:
                    slot_idx.append(slot)
                    src_idx.append(row)
                    dst_idx.append(dst + j)
        if not slot_idx:
            return
        s = torch.tensor(slot_idx, device=self.device)
        src_t = torch.tensor(src_idx, device=self.device)
        dst_t = torch.tensor(dst_idx, device=self.device)
        for layer in self.layers:
            # advanced indexing copies the sources first, so overlapping ranges are safe
            layer.keys[s, :, dst_t] = layer.keys[s, :, src_t]
            layer.values[s, :, dst_t] = layer.values[s, :, src_t]
