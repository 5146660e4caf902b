"""Preallocated per-sequence KV cache ("slots").

Layout per layer: ``keys, values: [num_slots + 1, kv_heads, max_len, head_dim]``. A sequence owns
one slot; row t holds the KV of its token t. The extra last slot is scratch: padding tokens of a
ragged batch write there, so real slots never see garbage and no write is out of bounds.

Each forward pass writes its new tokens' KV in place, where its ``ForwardPlan`` says (no
``torch.cat``); the attention backend reads the slots the plan names. After verification the
engine keeps the accepted rows with ``compact`` (rows move, in order, to the end of the committed
prefix) and forgets the rest by simply not counting them: the sequence's length lives in the
engine, rows past it are dead and get overwritten.
"""

from __future__ import annotations

import torch

from hedgerow.server.models.attention import ForwardPlan


class SlotKVCache:
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
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
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

    # --- one pass -----------------------------------------------------------------------------
    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, plan: ForwardPlan) -> None:
        """k, v: [B, N, Hkv, D], the new tokens' rows, to (slot, :, row) as the plan says."""
        keys, values = self.keys[layer], self.values[layer]
        keys[plan.write_slots, :, plan.write_rows] = k.to(keys.dtype)
        values[plan.write_slots, :, plan.write_rows] = v.to(values.dtype)

    # --- forking ---------------------------------------------------------------------------------
    def copy_rows(self, src_slot: int, dst_slot: int, rows: int) -> None:
        """Copy rows ``[0, rows)`` of ``src_slot`` into ``dst_slot``, every layer: a sample forked
        from another of the same prompt starts from the prompt KV that one's prefill computed.
        In place, so compiled passes and captured graphs still see the same tensors."""
        for keys, values in zip(self.keys, self.values):
            keys[dst_slot, :, :rows] = keys[src_slot, :, :rows]
            values[dst_slot, :, :rows] = values[src_slot, :, :rows]

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
        for keys, values in zip(self.keys, self.values):
            # advanced indexing copies the sources first, so overlapping ranges are safe
            keys[s, :, dst_t] = keys[s, :, src_t]
            values[s, :, dst_t] = values[s, :, src_t]
