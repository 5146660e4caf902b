"""Verification: one target pass over every tree of the batch, then acceptance.

With an overlap mode the target verifies in a worker thread (its own CUDA stream on a GPU) while
the draft drafts hedge branches here (drafting/branch.py); both results come back together.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from typing import Callable, Sequence as Seq

import torch

from hedgerow.drafting.branch import Hedge
from hedgerow.drafting.proposer import Drafts
from hedgerow.server.engine.runner import ModelRunner
from hedgerow.server.engine.sequence import Sequence
from hedgerow.verify.accept import Acceptance, accept
from hedgerow.verify.flatten import FlatBatch


class Verifier:
    def __init__(self, target: ModelRunner, overlap: bool):
        self.target = target
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
            logits = self.target.logits(self.target.forward([s.target_slot for s in batch], flat))
            generators = [s.generator(self.target.device) for s in batch]
            return accept(drafts.trees, logits, [s.sampling for s in batch], generators)

    def close(self) -> None:
        if self._worker is not None:
            self._worker.shutdown(wait=True)
