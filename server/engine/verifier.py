"""Verification: one target pass over every tree of the batch, then acceptance.

With an overlap mode the target verifies in a worker thread (its own CUDA stream on a GPU) while
the draft drafts hedge branches here (drafting/branch.py); both results come back together.

``min_tokens``: until a request has that many new tokens, the target's logits of its stop tokens
(EOS unless ``ignore_eos``, and ``stop_token_ids``) are -inf at every node whose token would come
before it: node u of depth d emits the request's token number ``num_generated + d``. Acceptance
then verifies against the masked distribution, as plain decoding with the same mask draws from it,
so the rule stays exact (a draft token the mask forbids is simply rejected).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import replace
from typing import Callable, Sequence as Seq

import torch

from hedgerow.drafting.branch import Hedge
from hedgerow.drafting.proposer import Drafts
from hedgerow.server.engine.runner import ModelRunner
from hedgerow.server.engine.sequence import Sequence
from hedgerow.verify.accept import Acceptance, accept
from hedgerow.verify.flatten import FlatBatch
from hedgerow.verify.logprobs import token_logprobs


class Verifier:
    def __init__(self, target: ModelRunner, overlap: bool, eos_token_ids: frozenset[int] = frozenset()):
        self.target = target
        self.eos_token_ids = eos_token_ids
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hedgerow-target") if overlap else None
        self._stream = torch.cuda.Stream(target.device) if overlap and target.device.type == "cuda" else None

    def verify(
        self,
        batch: Seq[Sequence],
        drafts: Drafts,
        flat: FlatBatch,
        hedge: Callable[[], list[list[Hedge]]] | None = None,
    ) -> tuple[list[Acceptance], list[list[Hedge]]]:
        """Acceptance per sequence, and the hedge branches ``hedge()`` drafted meanwhile (empty
        lists without an overlap mode)."""
        if self._worker is None or hedge is None:
            return self._accept(batch, drafts, flat), [[] for _ in batch]
        future = self._worker.submit(self._accept, batch, drafts, flat)
        try:
            hedges = hedge()
        except Exception:
            future.exception()  # never retry while the target is still writing its cache
            raise
        return future.result(), hedges

    def _accept(self, batch: Seq[Sequence], drafts: Drafts, flat: FlatBatch) -> list[Acceptance]:
        with torch.cuda.stream(self._stream) if self._stream is not None else nullcontext():
            logits = self.target.logits(self.target.forward([s.target_slot for s in batch], flat))  # [B, N, vocab]
            results = accept(drafts.trees, self._mask_stops(batch, drafts, logits), [s.sampling for s in batch],
                             [s.generator(self.target.device) for s in batch])
            # logprobs from the raw logits: the target's own distribution, before any mask or warping
            return [replace(res, logprobs=token_logprobs(logits[i], res.path, res.tokens, seq.request.logprobs))
                    if seq.request.logprobs is not None else res for i, (seq, res) in enumerate(zip(batch, results))]

    def _mask_stops(self, batch: Seq[Sequence], drafts: Drafts, logits: torch.Tensor) -> torch.Tensor:
        """``logits`` with each sequence's stop tokens at -inf where ``min_tokens`` forbids them
        (module docstring); the same tensor when no sequence needs it."""
        masked = None
        for i, seq in enumerate(batch):
            need = seq.request.min_tokens - seq.num_generated  # tokens still to come before a stop is allowed
            if need <= 0:
                continue
            stops = set(seq.request.stop_token_ids) | (set() if seq.request.ignore_eos else set(self.eos_token_ids))
            if not stops:
                continue
            tree = drafts.trees[i]
            nodes = torch.nonzero(tree.depths() < need).flatten().to(logits.device)
            masked = logits.clone() if masked is None else masked
            rows = masked[i, : tree.num_nodes]
            rows[nodes.unsqueeze(1), torch.tensor(sorted(stops), device=logits.device)] = float("-inf")
        return logits if masked is None else masked

    def close(self) -> None:
        if self._worker is not None:
            self._worker.shutdown(wait=True)
