"""Iteration-level scheduling: who joins the batch, and how many tokens each row feeds this step.

Admission walks the waiting queue oldest first. Each sequence first asks the adapter manager to
`acquire` its adapter: READY, WAITING (a cold adapter loads in the background, or no slot is
free yet) or FAILED (the sequence fails alone). A sequence whose adapter is not ready is passed
over, so requests for resident adapters keep flowing while cold ones load. Among ready
sequences admission is first-come, first-served against the batch size and the KV budget (a
sequence reserves prompt + max_new_tokens positions, so a running sequence never runs out of
KV; the leading blocks of its prompt that the prefix cache holds for its tenant and adapter are
shared, not recomputed, and the prompt tokens after them that a cached block holds are copied
into a block of its own); the oldest ready sequence is never skipped, so a large request cannot
starve. A sequence that has waited `slot_patience_steps` for a slot makes the manager drain one,
so a cold adapter cannot starve behind a stream of hot ones; the next few cold adapters in line
are read into host RAM ahead of time.

Every step gives each decoding sequence its one token, then fills the rest of the per-step
token cap with prefill chunks, oldest first; with a `Speculation`, the decoding sequences it
picks also feed their drafts, from what the prefill chunks leave of the cap.

Knows nothing about the model or sampling; adapters are keys the manager grants slots for.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from loraserve.adapters.manager import AdapterManager, Admission
from loraserve.engine.sequence import Sequence
from loraserve.engine.speculation import Speculation
from loraserve.model.blocks import BlockAllocator, BlockCopy

LOOKAHEAD_ADAPTERS = 4


@dataclass(frozen=True)
class StepPlan:
    """prefill: (sequence, tokens to feed) for rows in their prompt; decode: one token each,
    and after it the tokens `drafts` holds for its request id (those rows come last)."""

    prefill: list[tuple[Sequence, int]]
    decode: list[Sequence]
    drafts: dict[int, list[int]] = field(default_factory=dict)


class Scheduler:
    def __init__(
        self,
        allocator: BlockAllocator,
        adapters: AdapterManager,
        max_batch_size: int,
        max_step_tokens: int,
        slot_patience_steps: int = 8,
        speculation: Speculation | None = None,
        *,
        copy_kv: Callable[[BlockCopy], None],
    ) -> None:
        self.allocator = allocator
        self.adapters = adapters
        self.max_batch_size = max_batch_size
        self.max_step_tokens = max_step_tokens
        self.slot_patience_steps = slot_patience_steps
        self.speculation = speculation
        self.copy_kv = copy_kv
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def admit(self) -> tuple[list[Sequence], list[tuple[Sequence, Exception]]]:
        """Move ready waiting sequences into the batch; returns (admitted, failed with why)."""
        admitted: list[Sequence] = []
        failed: list[tuple[Sequence, Exception]] = []
        slotless: list[Sequence] = []
        for seq in list(self.waiting):
            grant = self.adapters.acquire(seq.adapter_key, seq.held_slot)
            seq.held_slot = grant.slot
            if grant.error is not None:
                failed.append((seq, grant.error))
                continue
            if grant.slot is None:
                seq.slot_wait_steps += 1
                slotless.append(seq)
                continue
            if grant.admission is not Admission.READY:
                continue
            if len(self.running) >= self.max_batch_size:
                break
            blocks = self.allocator.blocks_for(seq.kv_tokens)
            prompt = seq.token_ids[: seq.prompt_len]
            reservation = self.allocator.reserve(blocks, seq.prefix_chain, prompt)
            if reservation is None:
                break
            if reservation.copy is not None:
                self.copy_kv(reservation.copy)
                self.allocator.free([reservation.copy.source])
            self.waiting.remove(seq)
            seq.block_table = reservation.blocks
            seq.num_cached = reservation.cached_tokens
            self.running.append(seq)
            admitted.append(seq)
        if slotless and slotless[0].slot_wait_steps >= self.slot_patience_steps:
            self.adapters.make_room()
        for key in list(dict.fromkeys(s.adapter_key for s in slotless))[:LOOKAHEAD_ADAPTERS]:
            self.adapters.warm_host(key)
        return admitted, failed

    def plan(self) -> StepPlan:
        decode = [s for s in self.running if not s.in_prefill]
        budget = self.max_step_tokens - len(decode)
        prefill = []
        for seq in self.running:
            if seq.in_prefill and budget > 0:
                chunk = min(seq.prompt_len - seq.num_cached, budget)
                prefill.append((seq, chunk))
                budget -= chunk
        if self.speculation is None or budget <= 0:
            return StepPlan(prefill, decode)
        drafts = self.speculation.drafts(decode, budget)
        decode.sort(key=lambda s: s.request_id in drafts)  # stable: drafting rows last
        return StepPlan(prefill, decode, drafts)

    def remove(self, seq: Sequence) -> None:
        """Take `seq` out of the queue or the batch and free its KV blocks at once."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.allocator.free(seq.block_table)
        seq.block_table = []
