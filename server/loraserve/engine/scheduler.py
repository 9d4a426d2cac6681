"""Iteration-level scheduling: who joins the batch, and how many tokens each row feeds this step.

Admission is first-come, first-served against three limits: the batch size, the KV budget
(each sequence reserves prompt + max_new_tokens positions when admitted, so a running sequence
never runs out of KV), and the waiting queue's length. The head of the queue is never skipped,
so a large request cannot starve. Every step gives each decoding sequence its one token first,
then fills the rest of the per-step token cap with prefill chunks, oldest first.

Knows nothing about the model, sampling or adapters beyond a sequence's slot number.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from loraserve.engine.sequence import Sequence
from loraserve.model.kv_cache import BlockAllocator


@dataclass(frozen=True)
class StepPlan:
    """prefill: (sequence, tokens to feed) for rows in their prompt; decode: one token each."""

    prefill: list[tuple[Sequence, int]]
    decode: list[Sequence]


class Scheduler:
    def __init__(
        self, allocator: BlockAllocator, max_batch_size: int, max_step_tokens: int
    ) -> None:
        self.allocator = allocator
        self.max_batch_size = max_batch_size
        self.max_step_tokens = max_step_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def admit(self) -> list[Sequence]:
        """Move waiting sequences into the batch while the head fits; returns those admitted."""
        admitted = []
        while self.waiting and len(self.running) < self.max_batch_size:
            seq = self.waiting[0]
            blocks = self.allocator.blocks_for(seq.kv_tokens)
            if blocks > self.allocator.free_blocks:
                break
            self.waiting.popleft()
            seq.block_table = self.allocator.allocate(blocks)
            self.running.append(seq)
            admitted.append(seq)
        return admitted

    def plan(self) -> StepPlan:
        decode = [s for s in self.running if not s.in_prefill]
        budget = self.max_step_tokens - len(decode)
        prefill = []
        for seq in self.running:
            if seq.in_prefill and budget > 0:
                chunk = min(seq.prompt_len - seq.num_cached, budget)
                prefill.append((seq, chunk))
                budget -= chunk
        return StepPlan(prefill, decode)

    def remove(self, seq: Sequence) -> None:
        """Take `seq` out of the queue or the batch and free its KV blocks at once."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.allocator.free(seq.block_table)
        seq.block_table = []
