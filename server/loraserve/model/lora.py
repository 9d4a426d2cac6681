"""Batched multi-LoRA: the delta kernel, its slow reference, and the layer that holds slot buffers.

Every wrapped projection computes `y = base(x) + delta`, where each token's delta comes from the
adapter in that token's slot. The adapter's scaling (alpha / r, or alpha / sqrt(r) for rsLoRA)
is folded into B when a slot is filled. Slot 0 is all zeros: "no adapter" needs no branch.

Knows nothing about adapter names, files or which adapter lives in which slot: it sees slot
numbers and tensors. The runner sets one `LoraBatch` per forward on the shared `LoraContext`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class LoraSegment:
    """Tokens [start, end) of the flattened batch all use `slot`, whose rank is `rank`."""

    slot: int
    rank: int
    start: int
    end: int


@dataclass(frozen=True)
class LoraBatch:
    """Which slot each token of one forward uses, in the two layouts the kernel needs.

    token_slots: [N] int64, slot of each flattened token (row-major over [B, T]).
    segments: contiguous runs of tokens on one non-zero slot (used when rows are long).
    rank: the largest rank among the slots in use; 0 when no token uses an adapter.
    """

    token_slots: torch.Tensor
    segments: tuple[LoraSegment, ...]
    rank: int
    per_token: bool

    @classmethod
    def for_rows(
        cls, row_slots: list[int], row_len: int, slot_ranks: list[int], device: torch.device
    ) -> LoraBatch:
        """Rows of `row_len` tokens each, row b on slot row_slots[b]; slot_ranks[s] = rank of s."""
        token_slots = torch.tensor(row_slots, dtype=torch.int64, device=device)
        token_slots = token_slots.repeat_interleave(row_len)
        segments = tuple(
            LoraSegment(s, slot_ranks[s], b * row_len, (b + 1) * row_len)
            for b, s in enumerate(row_slots)
            if s != 0
        )
        rank = max((seg.rank for seg in segments), default=0)
        return cls(token_slots, segments, rank, per_token=row_len == 1)


def lora_delta(
    x: torch.Tensor, batch: LoraBatch, lora_a: torch.Tensor, lora_b: torch.Tensor
) -> torch.Tensor:
    """delta[t] = (x[t] @ lora_a[s_t]) @ lora_b[s_t], with s_t = batch.token_slots[t].

    x: [N, in]; lora_a: [S, in, R]; lora_b: [S, R, out] (scaling folded in); returns [N, out].
    Ranks below R are zero-padded, so slicing to the batch's largest rank is exact.

    One token per row (decode): gather each token's A and B and run two batched matmuls.
    Long rows (prefill): one pair of matmuls per contiguous segment on its own rank.
    """
    out = x.new_zeros(x.shape[0], lora_b.shape[-1])
    if batch.rank == 0:
        return out
    if batch.per_token:
        r = batch.rank
        a = lora_a[batch.token_slots, :, :r]  # [N, in, r]
        b = lora_b[batch.token_slots, :r]  # [N, r, out]
        return torch.bmm(torch.bmm(x.unsqueeze(1), a), b).squeeze(1)
    for seg in batch.segments:
        xs = x[seg.start : seg.end]
        out[seg.start : seg.end] = (xs @ lora_a[seg.slot, :, : seg.rank]) @ lora_b[
            seg.slot, : seg.rank
        ]
    return out


def lora_delta_reference(
    x: torch.Tensor, token_slots: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor
) -> torch.Tensor:
    """Slow, obviously-correct reference for `lora_delta`: one token at a time, full rank."""
    rows = [
        (x[t] @ lora_a[int(token_slots[t])]) @ lora_b[int(token_slots[t])] for t in range(len(x))
    ]
    return torch.stack(rows) if rows else x.new_zeros(0, lora_b.shape[-1])


class LoraContext:
    """The per-forward LoRA batch, shared by every wrapped layer of one model."""

    def __init__(self) -> None:
        self.batch: LoraBatch | None = None


class MultiLoraLinear(nn.Module):
    """A projection plus stacked LoRA slot buffers: `y = base(x) + lora_delta(x)`.

    lora_a: [num_slots, in_features, max_rank]; lora_b: [num_slots, max_rank, out_features].
    """

    def __init__(
        self,
        base: nn.Linear,
        context: LoraContext,
        num_slots: int,
        max_rank: int,
        dtype: torch.dtype,
    ) -> None:
        super().__init__()
        self.base = base
        self.context = context
        self.in_features = base.in_features
        self.out_features = base.out_features
        device = next(base.parameters()).device
        self.register_buffer(
            "lora_a", torch.zeros(num_slots, self.in_features, max_rank, dtype=dtype, device=device)
        )
        self.register_buffer(
            "lora_b",
            torch.zeros(num_slots, max_rank, self.out_features, dtype=dtype, device=device),
        )

    def set_slot(self, slot: int, a: torch.Tensor, b: torch.Tensor) -> None:
        """a: [in, r]; b: [r, out] with scaling already folded in."""
        r = a.shape[1]
        self.clear_slot(slot)
        self.lora_a[slot, :, :r].copy_(a)
        self.lora_b[slot, :r].copy_(b)

    def clear_slot(self, slot: int) -> None:
        self.lora_a[slot].zero_()
        self.lora_b[slot].zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, T, in] -> [B, T, out]."""
        y = self.base(x)
        batch = self.context.batch
        if batch is None or batch.rank == 0:
            return y
        delta = lora_delta(
            x.reshape(-1, self.in_features).to(self.lora_a.dtype), batch, self.lora_a, self.lora_b
        )
        return y + delta.view(y.shape).to(y.dtype)


def is_lora_target(module: nn.Module) -> bool:
    """Linear-like modules LoRA can wrap: nn.Linear and its bitsandbytes subclasses."""
    return isinstance(module, nn.Linear)


def wrap_lora_targets(
    model: nn.Module,
    context: LoraContext,
    num_slots: int,
    max_rank: int,
    dtype: torch.dtype,
    target_names: tuple[str, ...] = (),
) -> dict[str, MultiLoraLinear]:
    """Replace every linear projection inside the decoder by a `MultiLoraLinear`, in place.

    The output embedding (lm_head) is left alone. `target_names`, when given, restricts wrapping
    to modules whose last name component is listed (e.g. ("q_proj", "v_proj")).
    Returns the wrapped layers keyed by their module path in the original model.
    """
    output_embeddings = model.get_output_embeddings()
    names = [
        name
        for name, module in model.named_modules()
        if is_lora_target(module)
        and module is not output_embeddings
        and (not target_names or name.rsplit(".", 1)[-1] in target_names)
    ]
    wrapped = {}
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        layer = MultiLoraLinear(getattr(parent, child), context, num_slots, max_rank, dtype)
        setattr(parent, child, layer)
        wrapped[name] = layer
    return wrapped
