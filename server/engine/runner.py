"""Model runner: one model, its slot KV cache, and the two things the engine asks of it.

- ``forward(slots, flat)`` runs a flattened batch of token trees (``verify.flatten``) and returns
  the final hidden states ``[B, N, hidden]``; every node's KV is written into its slot.
- ``logits(hidden)`` applies the output head, fp32, only where the caller needs logits.

``extend`` feeds plain token runs (prefill, draft catch-up) in chunks. The model is native
(server/models/native) or transformers' (server/models/hf.py); either computes q, k, v and calls
the ``SlotAttention`` the runner hands it for the pass.
"""

from __future__ import annotations

import torch

from hedgerow.server.engine.kv_cache import SlotKVCache
from hedgerow.server.models import attention
from hedgerow.server.models.attention import ForwardPlan, TreeKernelPlan
from hedgerow.verify.flatten import FlatBatch, flatten
from hedgerow.verify.tree import DraftTree


class SlotAttention:
    """The ``attend(layer, q, k, v)`` of one pass: write k, v to the slots, attend as planned."""

    def __init__(self, cache: SlotKVCache, plan: ForwardPlan, backend: attention.Backend):
        self.cache, self.plan, self.backend = cache, plan, backend

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None):
        """q [B, N, Hq, D], k/v [B, N, Hkv, D] -> [B, N, Hq, D]."""
        self.cache.write(layer, k, v, self.plan)
        scale = scale if scale is not None else q.shape[-1] ** -0.5
        return self.backend(q, self.cache.keys[layer], self.cache.values[layer], self.plan, scale)


class ModelRunner:
    def __init__(self, model, *, num_slots: int, max_len: int, name: str = "model", backend: str = "reference"):
        self.name = name
        self.model = model
        self.device, self.dtype = model.device, model.dtype
        self.backend = attention.resolve_backend(backend, self.device)
        self._attend = attention.BACKENDS[self.backend]
        self.vocab_size = model.vocab_size
        self.max_len = max_len
        self.cache = SlotKVCache(
            num_layers=model.num_layers,
            num_slots=num_slots,
            max_len=max_len,
            kv_heads=model.num_kv_heads,
            head_dim=model.head_dim,
            dtype=self.dtype,
            device=self.device,
        )

    def plan(self, slots: list[int], flat: FlatBatch) -> ForwardPlan:
        """Where the pass writes (scratch for padding) and what it reads, on the model's device."""
        slot_t = torch.tensor(slots, dtype=torch.long, device=self.device)
        node = torch.arange(flat.tokens.shape[1], device=self.device)
        contiguous = slots == list(range(slots[0], slots[0] + len(slots)))
        tree = None
        if self.backend == "cuda" and bool(((flat.ancestors.sum(-1) == flat.depths + 1) | ~flat.valid).all()):
            # the kernel's shape: the prefix fully visible, then the block's own tree
            from hedgerow.server.models.kernels import pack_tree_mask

            tree = TreeKernelPlan(
                flat.prefix_lens.to(torch.int32), flat.num_nodes.to(torch.int32), pack_tree_mask(flat.ancestors)
            )
        return ForwardPlan(
            write_slots=torch.where(flat.valid, slot_t[:, None], self.cache.scratch_slot),
            write_rows=torch.where(flat.valid, flat.cache_rows, node[None, :]),
            read_slots=slot_t,
            mask=flat.mask,
            read_range=(slots[0], slots[0] + len(slots)) if contiguous else None,
            tree=tree,
        )

    @torch.inference_mode()
    def forward(self, slots: list[int], flat: FlatBatch) -> torch.Tensor:
        """Run one flattened batch; returns hidden states [B, N, hidden]."""
        rows_needed = int((flat.prefix_lens + flat.num_nodes).max())
        if rows_needed > self.max_len:
            raise ValueError(f"{self.name}: a block needs {rows_needed} KV rows, the cache holds {self.max_len}")
        flat = flat.to(self.device)
        attend = SlotAttention(self.cache, self.plan(slots, flat), self._attend)
        return self.model.forward(flat.tokens, flat.positions, attend)

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.logits(hidden)

    def extend(self, slots: list[int], prefix_lens: list[int], chains: list[list[int]], chunk: int) -> torch.Tensor:
        """Append token runs to the given slots, ``chunk`` tokens per sequence per pass.

        Returns the hidden state of each run's last token, [B, hidden].
        """
        last = [None] * len(slots)
        done = [0] * len(slots)
        while True:
            rows = [i for i, c in enumerate(chains) if done[i] < len(c)]
            if not rows:
                break
            pieces = [chains[i][done[i] : done[i] + chunk] for i in rows]
            flat = flatten([DraftTree.chain(p) for p in pieces], [prefix_lens[i] + done[i] for i in rows])
            hidden = self.forward([slots[i] for i in rows], flat)
            for k, i in enumerate(rows):
                done[i] += len(pieces[k])
                if done[i] == len(chains[i]):
                    last[i] = hidden[k, len(pieces[k]) - 1]
        return torch.stack(last)
