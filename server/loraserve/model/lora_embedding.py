"""LoRA on the input embedding: a per-slot lookup delta, as PEFT's embedding LoRA computes it.

For each token t on slot s, `y = base(t) + embed_scale * A_s[:, t] @ B_s` (B with the scaling
folded in), then DoRA's rescale where the slot has one (`slot_terms`). embed_scale is the base
embedding's own factor (Gemma scales its embeddings by sqrt(hidden)); PEFT scales the delta by
it too. The slots, their tiers and their eviction are the projections' (`lora`).

Knows nothing about adapter names or files: it sees slot numbers and tensors.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch
from torch import nn

from loraserve.model.slot_terms import (
    ModuleWeights,
    SlotCopies,
    SlotTerms,
    resolve_terms,
    weight_norm,
)

if TYPE_CHECKING:
    from loraserve.model.lora import LoraContext


class MultiLoraEmbedding(nn.Module):
    """The input embedding plus stacked LoRA slot buffers, as PEFT's embedding LoRA computes it:
    `y = (base(ids) + embed_scale * lora_a[s, ids] @ lora_b[s]) * scale`, the rescale only on
    DoRA slots. embed_scale is the base's own (Gemma scales its embeddings), 1 elsewhere.

    lora_a: [num_slots, vocab, max_rank] (a lookup table: row `id` is A's column `id`);
    lora_b: [num_slots, max_rank, hidden]. The wrapped embedding is kept as `base`.
    """

    lora_a: torch.Tensor
    lora_b: torch.Tensor

    def __init__(
        self,
        base: nn.Embedding,
        context: LoraContext,
        num_slots: int,
        max_rank: int,
        dtype: torch.dtype,
    ) -> None:
        super().__init__()
        self.base = base
        self.context = context
        self.in_features = base.num_embeddings
        self.out_features = base.embedding_dim
        device = base.weight.device
        self.register_buffer(
            "lora_a", torch.zeros(num_slots, self.in_features, max_rank, dtype=dtype, device=device)
        )
        self.register_buffer(
            "lora_b",
            torch.zeros(num_slots, max_rank, self.out_features, dtype=dtype, device=device),
        )
        self.terms = SlotTerms(num_slots, self.out_features, dtype, device, context.termed)
        self.filled = [False] * num_slots  # slot -> whether it holds a delta for the embedding

    @property
    def slot_nbytes(self) -> int:
        """Device bytes one slot of this layer takes."""
        return self.lora_a[0].nbytes + self.lora_b[0].nbytes + self.terms.slot_nbytes

    def resolve(self, weights: ModuleWeights) -> ModuleWeights:
        """`weights` with DoRA's rescale computed against the base embedding. Raises ValueError
        when they cannot be served here, or when PEFT's saved copy of the base embedding is
        not this base's (another base, or a resized vocabulary)."""
        if not weights.embedding:
            raise ValueError("lora_A / lora_B target a projection; this is the input embedding")
        weight = self.base.weight  # [vocab, hidden]
        copy = weights.base_copy
        if copy is not None:
            low = copy.dtype if copy.element_size() < weight.element_size() else weight.dtype
            if not torch.equal(copy.to(weight.device, low), weight.to(low)):
                raise ValueError(
                    "the adapter's saved copy of the base embedding differs from this base "
                    "model's (trained on another base, or with a resized vocabulary)"
                )
        norm = None if weights.magnitude is None else weight_norm(weight.T, weights.a, weights.b)
        return resolve_terms(weights, norm, None)

    def set_slot(
        self,
        slot: int,
        a: torch.Tensor,
        b: torch.Tensor,
        scale: torch.Tensor | None = None,
        shift: torch.Tensor | None = None,
        copies: SlotCopies | None = None,
        lora_scale: float = 1.0,
        stored_half: torch.dtype | None = None,
        unscaled: bool = False,
    ) -> None:
        """a: [r, vocab]; b: [r, hidden] with the scaling `lora_scale` folded in, or without it
        where `unscaled` (these slots are in the compute dtype and fold it in, whatever dtype
        the adapter stores them in: `stored_half` changes nothing here); scale, shift: [hidden]
        or None. copies: where to leave the copies of a and b for the caller to run (None: run
        now)."""
        r = a.shape[0]
        pending = SlotCopies() if copies is None else copies
        self.clear_slot(slot)
        pending.add(self.lora_a[slot, :, :r], a.T)
        pending.add(self.lora_b[slot, :r], b, lora_scale if unscaled else None)
        self.filled[slot] = r > 0
        self.terms.set_slot(slot, scale, shift)
        if copies is None:
            pending.run()

    def clear_slot(self, slot: int) -> None:
        """Zero the slot; one that holds no delta is all zeros already (see `set_slot`)."""
        if self.filled[slot]:
            self.lora_a[slot].zero_()
            self.lora_b[slot].zero_()
        self.filled[slot] = False
        self.terms.clear_slot(slot)

    def holds_delta(self, slots: Iterable[int]) -> bool:
        """Whether any of `slots` holds a delta for the embedding."""
        return any(self.filled[slot] for slot in slots)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids: [...] int64 -> [..., hidden]."""
        y = self.base(ids)
        batch = self.context.batch
        if batch is None or not batch.any_adapter:
            return y
        flat_y, flat_ids = y.view(-1, self.out_features), ids.reshape(-1)
        embed_scale = getattr(self.base, "embed_scale", None)
        if batch.in_graph:  # every token's slot rows gathered (zeros where it has no delta)
            slots = batch.token_slots
            shrunk = self.lora_a[slots, flat_ids]  # [N, R]
            delta = torch.bmm(shrunk.unsqueeze(1), self.lora_b.index_select(0, slots))[:, 0]
            if embed_scale is not None:
                delta *= torch.as_tensor(embed_scale).to(delta.dtype)
            flat_y += delta  # [N, hidden]
        for seg in batch.segments:
            if not self.filled[seg.slot]:
                continue
            rows = slice(seg.start, seg.end)
            shrunk = self.lora_a[seg.slot, flat_ids[rows], : seg.rank]  # [n, r]
            delta = shrunk @ self.lora_b[seg.slot, : seg.rank]  # [n, hidden]
            if embed_scale is not None:
                delta *= torch.as_tensor(embed_scale).to(delta.dtype)
            flat_y[rows] += delta
        self.terms.apply_(flat_y, batch)
        return y
