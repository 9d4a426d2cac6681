"""The state of one request inside the engine, from admission to retirement.

Knows nothing about the model or the scheduler's policy: it is bookkeeping of token ids, KV
positions, the adapter's key and slot, and where to send events.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

import torch

from loraserve.adapters.keys import AdapterKey
from loraserve.model.detokenizer import IncrementalDetokenizer
from loraserve.model.grammar import GrammarState
from loraserve.types import DEFAULT_TENANT, FinalEvent, SamplingParams, TokenEvent

Event = TokenEvent | FinalEvent | Exception
EmitFn = Callable[[Event], None]


@dataclass(eq=False)
class Sequence:
    """One request: `token_ids` is prompt + generated; the first `num_cached` are in KV."""

    request_id: int
    prompt_len: int
    token_ids: list[int]
    params: SamplingParams
    adapter_key: AdapterKey | None  # resolved once, at submission; None = base model
    kv_tokens: int  # KV positions reserved at admission: prompt + max_new_tokens
    detokenizer: IncrementalDetokenizer
    generator: torch.Generator | None
    emit: EmitFn
    tenant: str = DEFAULT_TENANT  # its metrics' tenant label (Metrics.tenant_label): bounded
    arrived_at: float = 0.0  # time.monotonic() at submission
    last_token_at: float = 0.0
    held_slot: int | None = None  # the slot its adapter grant holds a reference on, if any
    slot_wait_steps: int = 0  # steps spent waiting for a slot
    block_table: list[int] = field(default_factory=list)
    # where its full KV blocks are published (tenant, adapter key; None: nowhere), and their
    # chain so far: the namespace's digest, then its prompt's blocks' hashes and those of the
    # blocks its generated tokens fill
    prefix_namespace: Hashable | None = None
    prefix_chain: list[bytes] = field(default_factory=list)
    num_cached: int = 0
    grammar: GrammarState | None = None  # its constraint's state; None = unconstrained
    queued: bool = True  # counts against max_waiting until admitted or retired
    cancelled: bool = False

    @property
    def lora_slot(self) -> int:
        """The LoRA slot of an admitted sequence (admission waits until its grant is READY)."""
        if self.held_slot is None:
            raise RuntimeError(f"request {self.request_id} has no LoRA slot before admission")
        return self.held_slot

    @property
    def num_generated(self) -> int:
        return len(self.token_ids) - self.prompt_len

    @property
    def pending(self) -> int:
        """Tokens not yet fed to the model: the rest of the prompt, or the last sampled token."""
        return len(self.token_ids) - self.num_cached

    @property
    def in_prefill(self) -> bool:
        return self.num_cached < self.prompt_len

    def history(self, device: torch.device) -> torch.Tensor:
        """[n] int64: every token so far (for the repetition penalty)."""
        return torch.tensor(self.token_ids, dtype=torch.int64, device=device)
