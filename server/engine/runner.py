"""Model runner: one model, its slot KV cache, and the two things the engine asks of it.

- ``forward(slots, flat)`` runs a flattened batch of token trees (``verify.flatten``) and returns
  the final hidden states ``[B, N, hidden]``; every node's KV is written into its slot.
- ``logits(hidden)`` applies the output head, fp32, only where the caller needs logits.

``extend`` feeds plain token chains (prefill, draft catch-up) in chunks.
"""

from __future__ import annotations

import torch

from hedgerow.server.engine.kv_cache import SlotKVCache, WritePlan
from hedgerow.server.models import attention
from hedgerow.verify.flatten import FlatBatch, flatten
from hedgerow.verify.tree import chain_parents


class _Chain:
    """A token chain in the shape ``flatten`` takes."""

    def __init__(self, tokens: list[int]):
        self.tokens = torch.tensor(tokens, dtype=torch.long)
        self.parents = chain_parents(len(tokens))


class ModelRunner:
    def __init__(
        self, model: torch.nn.Module, *, num_slots: int, max_len: int, name: str = "model", backend: str = "reference"
    ):
        self.name = name
        self.backend = attention.resolve_backend(backend, next(model.parameters()).device)
        attention.register()
        model.set_attn_implementation(attention.BACKENDS[self.backend])
        self.model = model.eval()
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        cfg = model.config.get_text_config()
        heads = cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        self.decoder = model.base_model
        self.lm_head = model.get_output_embeddings()
        self.vocab_size = self.lm_head.weight.shape[0]
        self.max_len = max_len
        self.cache = SlotKVCache(
            num_layers=cfg.num_hidden_layers,
            num_slots=num_slots,
            max_len=max_len,
            kv_heads=getattr(cfg, "num_key_value_heads", None) or heads,
            head_dim=head_dim,
            dtype=self.dtype,
            device=self.device,
        )

    @torch.inference_mode()
    def forward(self, slots: list[int], flat: FlatBatch) -> torch.Tensor:
        """Run one flattened batch; returns hidden states [B, N, hidden]."""
        rows_needed = int((flat.prefix_lens + flat.num_nodes).max())
        if rows_needed > self.max_len:
            raise ValueError(f"{self.name}: a block needs {rows_needed} KV rows, the cache holds {self.max_len}")
        flat = flat.to(self.device)
        slot_t = torch.tensor(slots, dtype=torch.long, device=self.device)
        node = torch.arange(flat.tokens.shape[1], device=self.device)
        contiguous = slots == list(range(slots[0], slots[0] + len(slots)))
        plan = WritePlan(
            write_slots=torch.where(flat.valid, slot_t[:, None], self.cache.scratch_slot),
            write_rows=torch.where(flat.valid, flat.cache_rows, node[None, :]),
            read_slots=slot_t,
            read_range=(slots[0], slots[0] + len(slots)) if contiguous else None,
            kv_len=flat.kv_len,
        )
        if self.backend == "cuda" and bool(((flat.ancestors.sum(-1) == flat.depths + 1) | ~flat.valid).all()):
            # the kernel's shape: the prefix fully visible, then the block's own tree
            from hedgerow.server.models.cuda_kernels import pack_tree_mask

            plan.raw = True
            plan.prefix_lens = flat.prefix_lens.to(torch.int32)
            plan.num_nodes = flat.num_nodes.to(torch.int32)
            plan.tree_bits = pack_tree_mask(flat.ancestors)
        self.cache.set_plan(plan)
        try:
            with attention.forward_plan(plan):
                out = self.decoder(
                    input_ids=flat.tokens,
                    position_ids=flat.positions,
                    attention_mask=flat.mask,
                    past_key_values=self.cache,
                    use_cache=True,
                )
        finally:
            self.cache.set_plan(None)
        return out.last_hidden_state

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()

    def extend(
        self, slots: list[int], prefix_lens: list[int], chains: list[list[int]], chunk: int
    ) -> torch.Tensor:
        """Append token chains to the given slots, ``chunk`` tokens per sequence per pass.

        Returns the hidden state of each chain's last token, [B, hidden].
        """
        last = [None] * len(slots)
        done = [0] * len(slots)
        while True:
            rows = [i for i, c in enumerate(chains) if done[i] < len(c)]
            if not rows:
                break
            pieces = [chains[i][done[i] : done[i] + chunk] for i in rows]
            flat = flatten([_Chain(p) for p in pieces], [prefix_lens[i] + done[i] for i in rows])
            hidden = self.forward([slots[i] for i in rows], flat)
            for k, i in enumerate(rows):
                done[i] += len(pieces[k])
                if done[i] == len(chains[i]):
                    last[i] = hidden[k, len(pieces[k]) - 1]
        return torch.stack(last)
