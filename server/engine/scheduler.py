"""First-come-first-served admission: waiting requests join the running batch between steps
while both models have a free KV slot for them; finished and aborted sequences leave."""

from __future__ import annotations

from collections import deque

from hedgerow.server.engine.kv_cache import SlotKVCache
from hedgerow.server.engine.sequence import FinishReason, Sequence


class Scheduler:
    def __init__(self, target_cache: SlotKVCache, draft_cache: SlotKVCache | None, max_waiting: int):
        self.target_cache = target_cache
        self.draft_cache = draft_cache
        self.max_waiting = max_waiting
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def __len__(self) -> int:
        return len(self.waiting) + len(self.running)

    def add(self, seq: Sequence) -> None:
        if len(self.waiting) >= self.max_waiting:
            raise OverflowError(f"the waiting queue is full ({self.max_waiting} requests)")
        self.waiting.append(seq)

    def admit(self) -> list[Sequence]:
        """Move waiting sequences into the batch while slots last; returns the new ones."""
        admitted = []
        while self.waiting and self.target_cache.free_slots:
            seq = self.waiting[0]
            needs_draft = seq.spec.uses_model  # n-gram proposals need no draft slot
            if needs_draft and not self.draft_cache.free_slots:
                break
            self.waiting.popleft()
            seq.target_slot = self.target_cache.allocate()
            if needs_draft:
                seq.draft_slot = self.draft_cache.allocate()
            self.running.append(seq)
            admitted.append(seq)
        return admitted

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        """Mark finished and give its slots back (safe to call for waiting sequences too)."""
        seq.finish_reason = reason
        if seq.target_slot is not None:
            self.target_cache.release(seq.target_slot)
            seq.target_slot = None
        if seq.draft_slot is not None:
            self.draft_cache.release(seq.draft_slot)
            seq.draft_slot = None
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)

    def find(self, request_id: str) -> Sequence | None:
        for seq in (*self.running, *self.waiting):
            if seq.request_id == request_id:
                return seq
        return None
