"""Model runner: one model, its slot KV cache, and the two things the engine asks of it.

- ``forward(slots, flat)`` runs a flattened batch of token trees (``verify.flatten``) and returns
  the final hidden states ``[B, N, hidden]``; every node's KV is written into its slot.
- ``logits(hidden)`` applies the output head, fp32, only where the caller needs logits.

``extend`` feeds plain token runs (prefill, draft catch-up) in chunks. The model is native
(server/models/native) or transformers' (server/models/hf.py); either computes q, k, v and calls
the ``SlotAttention`` the runner hands it for the pass. Passes of repeating shapes may run
compiled or as CUDA graphs (server/engine/fast_pass.py).
"""

from __future__ import annotations

import torch

from hedgerow.server.engine import fast_pass
from hedgerow.server.engine.fast_pass import CompiledPasses, CudaGraphPasses, PassFunction, SlotAttention, plan_args
from hedgerow.server.engine.greedy_run import GreedyRuns
from hedgerow.server.engine.kv_cache import SlotKVCache
from hedgerow.server.models import attention
from hedgerow.server.models.attention import ForwardPlan, TreeKernelPlan
from hedgerow.verify.flatten import FlatBatch, flatten, flatten_chains
from hedgerow.verify.tree import DraftTree

COMPILE_MODES = ("off", "on", "auto")


class ModelRunner:
    def __init__(
        self,
        model,
        *,
        num_slots: int,
        max_len: int,
        name: str = "model",
        backend: str = "reference",
        compile: str = "off",
        compile_backend: str = "inductor",
        cuda_graphs: str = "off",
        drafts: bool = False,
    ):
        """``compile``: off | on (compile now) | auto (compile in the background, use what times
        faster) -- CPU only, with torch.compile's ``compile_backend``; ``cuda_graphs``: off | auto
        (capture each bucket at its first use) -- CUDA only. ``drafts``: the model drafts, so its greedy
        chains are compiled too (server/engine/greedy_run.py)."""
        if compile not in COMPILE_MODES:
            raise ValueError(f"compile must be one of {', '.join(COMPILE_MODES)}, got {compile!r}")
        if cuda_graphs not in ("off", "auto"):
            raise ValueError(f"cuda_graphs must be off or auto, got {cuda_graphs!r}")
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
        self.pass_fn = PassFunction(model, self.cache, self._attend)
        cuda = self.device.type == "cuda"
        self.graphs = CudaGraphPasses(self.pass_fn, self.cache, num_slots, name) if cuda and cuda_graphs == "auto" else None
        self.compiled = CompiledPasses(self.pass_fn, name, compile_backend) if not cuda and compile != "off" else None
        # greedy runs where they are measured to pay: the CPU. On CUDA a pass replays a CUDA graph,
        # and a greedy run, not captured yet, would launch every kernel of every token from Python
        self.greedy_runs = not cuda
        self.greedy = GreedyRuns(model, self.cache, self._attend, name,
                                 compile_backend if self.compiled is not None and drafts else None)
        if self.compiled is not None:
            examples = {(b == 1, n == 1): self._example(b, n) for b in (1, 2) for n in (1, 4)}

            def prepare(measure: bool) -> None:
                self.compiled.prepare(examples, measure=measure)
                if self.greedy.compiled is not None:
                    self.greedy.prepare(self.vocab_size, measure=measure)

            if compile == "on":
                prepare(False)
            else:
                fast_pass.start_background(lambda: prepare(True), f"{name}-compile")

    @torch.inference_mode()  # as every pass's tensors: a compiled pass is specialised on it
    def _example(self, batch: int, nodes: int) -> tuple:
        """Arguments of a pass that writes and reads the scratch slot only (after 16 rows, so that
        no size of the example is 1 by accident: a size of 1 would be compiled in as a constant)."""
        flat = flatten([DraftTree.chain([0] * nodes)] * batch, [16] * batch).to(self.device)
        plan = self.plan([self.cache.scratch_slot] * batch, flat, view=False)
        return plan_args(plan, flat.tokens, flat.positions)

    def plan(self, slots: list[int], flat: FlatBatch, view: bool = True) -> ForwardPlan:
        """Where the pass writes (scratch for padding) and what it reads, on the model's device.
        ``view``: read a contiguous run of slots as a view (eager passes; a compiled or captured
        pass always gathers the slots it reads)."""
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
            read_range=(slots[0], slots[0] + len(slots)) if contiguous and view else None,
            tree=tree,
        )

    @torch.inference_mode()
    def forward(self, slots: list[int], flat: FlatBatch) -> torch.Tensor:
        """Run one flattened batch; returns hidden states [B, N, hidden]."""
        if flat.kv_len > self.max_len:  # the rows a pass reads are the rows it needs
            raise ValueError(f"{self.name}: a block needs {flat.kv_len} KV rows, the cache holds {self.max_len}")
        batch, nodes = flat.tokens.shape
        if self.graphs is not None and self.graphs.accepts(batch, nodes):
            shape = self.graphs.shape(flat)
            padded = flat.padded(*shape).to(self.device)
            plan = self.plan(slots + [self.cache.scratch_slot] * (shape[0] - batch), padded, view=False)
            key = (*shape, plan.tree is not None)
            return self.graphs(key, plan_args(plan, padded.tokens, padded.positions), batch, nodes)
        if self.device.type != "cpu":  # batches are built on the CPU
            flat = flat.to(self.device)
        if self.compiled is not None and self.compiled.accepts(batch, nodes):
            plan = self.plan(slots, flat, view=False)
            return self.compiled(*plan_args(plan, flat.tokens, flat.positions))
        attend = SlotAttention(self.cache, self.plan(slots, flat), self._attend)
        return self.model.forward(flat.tokens, flat.positions, attend)

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.logits(hidden)

    def greedy_chains(self, slots: list[int], starts: list[int], fed: list[list[int]], tokens: int,
                      vocab: int) -> tuple[list[list[int]], torch.Tensor]:
        """Feed each row its tokens, then draft ``tokens`` greedy tokens per row in as few calls as
        possible (server/engine/greedy_run.py): the tokens and the logits each was chosen from."""
        return self.greedy(slots, starts, fed, tokens, min(vocab, self.vocab_size))

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
            flat = flatten_chains(pieces, [prefix_lens[i] + done[i] for i in rows])
            hidden = self.forward([slots[i] for i in rows], flat)
            for k, i in enumerate(rows):
                done[i] += len(pieces[k])
                if done[i] == len(chains[i]):
                    last[i] = hidden[k, len(pieces[k]) - 1]
        return torch.stack(last)
