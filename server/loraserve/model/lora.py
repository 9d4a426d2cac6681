"""Batched multi-LoRA: the delta kernel, its slow reference, and the layer that holds slot buffers.

Every wrapped projection computes, for each token t on slot s, `y = base(x) + x A_s^T B_s`: the
adapter's scaling (alpha / r, or alpha / sqrt(r) for rsLoRA) is folded into B when a slot is
filled. Slots may be narrower than the compute dtype (bf16 slots under fp32 compute: half the
bytes to hold and to stream each step); those keep B as the adapter stores it and the scaling
apart, applied to `x A_s^T`, since folding it in would round B. Float32 slots may also hold one
adapter's module in bf16 or fp16 where it was stored so (`NarrowSlots`: the first half of the
slot's bytes, the scaling apart as in bf16 slots): exact, and half the bytes a step streams for
its tokens. A slot may also hold a per-output affine term, applied to its rows after the delta:
`y = y * scale_s + shift_s` (DoRA's rescale and the adapter's bias terms, see `slot_terms`);
slots without one skip it.
Slot 0 is all zeros: "no adapter" needs no branch. The input embedding gets the same slots as a
lookup (`lora_embedding`).

Knows nothing about adapter names, files or which adapter lives in which slot: it sees slot
numbers and tensors. The runner sets one `LoraBatch` per forward on the shared `LoraContext`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel

from loraserve.model import huge_pages
from loraserve.model.kernels import native
from loraserve.model.linear import BaseLinear
from loraserve.model.lora_embedding import MultiLoraEmbedding
from loraserve.model.slot_terms import (
    ModuleWeights,
    SlotCopies,
    SlotTerms,
    TermedSlots,
    dequantized_weight,
    expanded_weight_norm,
    resolve_terms,
    row_norms_squared,
    weight_norm,
)


@dataclass(frozen=True)
class LoraSegment:
    """Tokens [start, end) of the flattened batch all use `slot`, whose rank is `rank`."""

    slot: int
    rank: int
    start: int
    end: int


@dataclass(frozen=True)
class LoraBatch:
    """The maximal runs of consecutive tokens on one non-zero slot, for one forward.

    The runner orders rows by slot, so a batch has one segment per distinct adapter in it.
    `columns` holds the same segments as tensors for the compiled kernel, built once for every
    layer: starts, ends, slots and ranks, each [G] int64. `token_slots` is built for the
    gathered form when it asks, or ahead (`slots`). A batch `for_graph` has no segments: its
    slots are in `slots`, refilled before each replay. With `every_term` the layers apply every
    slot's DoRA and bias terms to every token, gathered by `token_slots` (slots without a term
    hold the identity), instead of per segment where a slot has one: what a CUDA graph or a
    decode record (`with_gathered_terms`) replays whatever the slots hold.
    """

    segments: tuple[LoraSegment, ...]
    columns: tuple[torch.Tensor, ...]
    row_slots: tuple[int, ...]
    row_tokens: tuple[int, ...]
    device: torch.device
    slots: torch.Tensor | None = None
    in_graph: bool = False
    every_term: bool = False

    @functools.cached_property
    def token_slots(self) -> torch.Tensor:
        """[N] int64 on `device`: every token's slot (0 for the base)."""
        if self.slots is not None:
            return self.slots
        slots = [slot for slot, count in zip(self.row_slots, self.row_tokens) for _ in range(count)]
        return torch.tensor(slots, dtype=torch.int64, device=self.device)

    @property
    def any_adapter(self) -> bool:
        """Whether any token may be on an adapter: the layers' deltas have work to do."""
        return bool(self.segments) or self.in_graph

    def with_gathered_terms(self) -> LoraBatch:
        """This batch with `every_term`, its `token_slots` built now: each layer's terms then
        take the same ops whatever the slots hold, as a record of the forward replays them.
        Each row's terms are the same elementwise multiply and add as per segment, so its
        values are too (a slot without a term multiplies by one and adds zero)."""
        return replace(self, slots=self.token_slots, every_term=True)

    @classmethod
    def for_graph(cls, token_slots: torch.Tensor, terms: bool) -> LoraBatch:
        """A batch for a CUDA graph to capture: each token's slot read from token_slots [N]
        int64, a static buffer the host refills before every replay. What the graph records
        must not depend on the slots it was captured with, so every layer takes the gathered
        form over every token and, with `terms`, applies every slot's terms (slot 0, and slots
        without a term, hold zeros and the identity); without, it serves only slots that hold
        no term in any layer."""
        return cls((), (), (), (), token_slots.device, token_slots, True, terms)

    @classmethod
    def for_rows(
        cls,
        row_slots: list[int],
        row_tokens: list[int],
        slot_ranks: list[int],
        device: torch.device | str = "cpu",
    ) -> LoraBatch:
        """Rows laid end to end, row b holding row_tokens[b] tokens on slot row_slots[b];
        slot_ranks[s] = rank of slot s."""
        segments: list[LoraSegment] = []
        end = 0
        for slot, count in zip(row_slots, row_tokens):
            start, end = end, end + count
            if slot == 0 or count == 0:
                continue
            if segments and segments[-1].slot == slot and segments[-1].end == start:
                segments[-1] = replace(segments[-1], end=end)
            else:
                segments.append(LoraSegment(slot, slot_ranks[slot], start, end))
        table = torch.tensor(
            [[g.start for g in segments], [g.end for g in segments],
             [g.slot for g in segments], [g.rank for g in segments]],
            dtype=torch.int64,
        ).reshape(4, len(segments))  # fmt: skip
        return cls(
            tuple(segments), table.unbind(0), tuple(row_slots), tuple(row_tokens),
            torch.device(device),
        )  # fmt: skip


# The gathered form copies every token's slot weights, N * R * (in + out) elements: above this
# (a prefill-sized batch) the copies cost more than the launches they save.
GATHERED_MAX_ELEMENTS = 1 << 24


def add_lora_delta_(
    y: torch.Tensor,
    x: torch.Tensor,
    batch: LoraBatch,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    *,
    gathered: bool,
    scales: SlotScales | None = None,
    narrow: NarrowSlots | None = None,
    invariant: bool = False,
) -> torch.Tensor:
    """y[t] += (x[t] @ lora_a[s_t].T) * scale[s_t] @ lora_b[s_t] for every token t on slot s_t
    != 0; returns y. `invariant`: each token's delta the same whatever tokens share its call
    (the CPU kernel's form that never takes AMX tiles).

    y: [N, out] (updated in place); x: [N, in]; lora_a: [S, R, in]; lora_b: [S, R, out], in the
    compute dtype or narrower; `scales`: each slot's scaling, or None where it is folded into
    lora_b; `narrow`: which float32 slots hold 16-bit rows (`narrow_rows`), or None for none.
    Ranks below R are zero-padded, so each segment uses its slot's own rank.

    On the CPU, one compiled call covers every segment (shrink and expand per chunk of a
    segment's tokens, chunks in parallel), in fp32: in a 16-bit compute dtype it widens each
    chunk's rows and adds the chunk's delta, summed in fp32, to y in one rounding. Elsewhere, with
    `gathered` (what `takes_gathered_form` says of this forward: on a GPU, a decode-sized batch
    of several adapters, and every batch `for_graph`), the gathered form (`gathered_lora_delta_`,
    four launches however many adapters); otherwise one fused multiply-add per segment
    (`segmented_lora_delta_`).
    """
    ops = native()
    kernel_reads = y.device.type == "cpu" and not batch.in_graph and y.dtype == x.dtype
    if ops is not None and kernel_reads and y.is_contiguous():
        starts, ends, slots, ranks = batch.columns
        values = None if scales is None else scales.values
        codes = None if narrow is None else narrow.codes
        ops.lora_delta_(
            x.contiguous(), y, lora_a, lora_b, starts, ends, slots, ranks, values, codes, invariant
        )
        return y
    if gathered:
        return gathered_lora_delta_(y, x, batch.token_slots, lora_a, lora_b, scales, narrow)
    return segmented_lora_delta_(y, x, batch, lora_a, lora_b, scales, narrow)


def takes_gathered_form(
    batch: LoraBatch, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor
) -> bool:
    """Whether this forward's delta and slot terms take the gathered form: on a GPU, where each
    launch costs more than its arithmetic, for more than two adapters, while the copies stay
    under GATHERED_MAX_ELEMENTS; and every batch a CUDA graph captures (on any device).
    x: [N, in]; lora_a: [S, R, in]; lora_b: [S, R, out]."""
    if batch.in_graph:
        return True
    if x.device.type == "cpu" or len(batch.segments) <= 2:
        return False
    copied = x.shape[0] * lora_a.shape[1] * (lora_a.shape[2] + lora_b.shape[2])
    return copied <= GATHERED_MAX_ELEMENTS


def segmented_lora_delta_(
    y: torch.Tensor,
    x: torch.Tensor,
    batch: LoraBatch,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scales: SlotScales | None = None,
    narrow: NarrowSlots | None = None,
) -> torch.Tensor:
    """`add_lora_delta_` as one shrink and one fused expand-and-add per segment (SGMV's work in
    2 x G calls), on views of the slot buffers at each slot's own rank: nothing is copied
    (but slots narrower than x, widened per segment)."""
    for seg in batch.segments:
        rows = slice(seg.start, seg.end)
        a = slot_rows(lora_a, seg.slot, narrow)[: seg.rank]
        shrunk = F.linear(x[rows], a.to(x.dtype))  # [n, r]
        if scales is not None:
            shrunk *= scales.of(seg.slot)
        y[rows].addmm_(shrunk, slot_rows(lora_b, seg.slot, narrow)[: seg.rank].to(y.dtype))
    return y


def gathered_lora_delta_(
    y: torch.Tensor,
    x: torch.Tensor,
    token_slots: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scales: SlotScales | None = None,
    narrow: NarrowSlots | None = None,
) -> torch.Tensor:
    """`add_lora_delta_` in Punica's BGMV form: every token's slot weights gathered, then one
    batched shrink and one batched expand-and-add, at the full padded rank R (the padding and
    slot 0 are zeros, so they add exactly zero to finite values). token_slots: [N] int64 on
    y's device. Copies N * R * (in + out) elements; four launches for any mix of adapters
    (slots narrower than x, scales, or slots holding 16-bit rows add a few)."""
    a = gathered_slot_rows(lora_a, token_slots, narrow).to(x.dtype)  # [N, R, in]
    b = gathered_slot_rows(lora_b, token_slots, narrow).to(y.dtype)  # [N, R, out]
    shrunk = torch.bmm(a, x.unsqueeze(-1))  # [N, R, 1]
    if scales is not None:
        shrunk *= scales.values.index_select(0, token_slots).to(shrunk.dtype)[:, None, None]
    y.unsqueeze(1).baddbmm_(shrunk.transpose(1, 2), b)  # [N, 1, out] += [N, 1, R] @ [N, R, out]
    return y


def transposed_bs(bs: list[torch.Tensor], scales: list[float]) -> list[torch.Tensor]:
    """Each B as PEFT stores it, bs[i]: [out, r] (any float dtype), as the slots hold it:
    [r, out] float32, times scales[i] (the adapter's alpha / r). On CPUs one compiled call
    for all of them, into one buffer (a strided copy per B was half of an adapter's load)."""
    ops = native()
    if ops is not None and bs and all(b.device.type == "cpu" for b in bs):
        return ops.transpose_scaled(bs, scales)
    return [b.to(torch.float32).t().contiguous().mul_(scale) for b, scale in zip(bs, scales)]


def lora_delta_reference(
    x: torch.Tensor,
    token_slots: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scales: SlotScales | None = None,
    narrow: NarrowSlots | None = None,
) -> torch.Tensor:
    """Slow, obviously-correct reference for the delta `add_lora_delta_` adds: one token at a
    time, full padded rank, slots widened to x's dtype. x: [N, in]; token_slots: [N] int;
    returns [N, out]."""
    rows = []
    for t in range(len(x)):
        slot = int(token_slots[t])
        shrunk = x[t] @ slot_rows(lora_a, slot, narrow).to(x.dtype).T
        if scales is not None:
            shrunk = shrunk * scales.of(slot)
        rows.append(shrunk @ slot_rows(lora_b, slot, narrow).to(x.dtype))
    return torch.stack(rows) if rows else x.new_zeros(0, lora_b.shape[-1])


class SlotScales:
    """Each slot's LoRA scaling, for slots that keep it apart from B: `values` [S] float32 on
    the slots' device (what kernels read) and the same numbers on the host (what a loop over
    segments reads without a device-to-host copy). Slot 0 and empty slots hold 1."""

    def __init__(self, num_slots: int, device: torch.device) -> None:
        self.values = torch.ones(num_slots, dtype=torch.float32, device=device)
        self._host = [1.0] * num_slots

    def of(self, slot: int) -> float:
        return self._host[slot]

    def set(self, slot: int, scale: float) -> None:
        if self._host[slot] != scale:  # a tensor write costs microseconds (on CUDA, a copy)
            self.values[slot] = scale
            self._host[slot] = scale


class NarrowSlots:
    """Which slots of float32 buffers hold their module's A and B in 16 bits, bf16 or fp16, in
    the first half of the slot's bytes (`narrow_rows`), for a module the adapter stores in that
    dtype: served with the very same values, at half the bytes a step streams. `codes` [S]
    uint8 on the slots' device (what kernels read: 0 float32 rows, else `CODES`' index of the
    dtype, as `lora.h` numbers them); the same on the host (what a loop over segments reads)."""

    CODES: tuple[torch.dtype | None, ...] = (None, torch.bfloat16, torch.float16)

    def __init__(self, num_slots: int, device: torch.device) -> None:
        self.codes = torch.zeros(num_slots, dtype=torch.uint8, device=device)
        self._host: list[torch.dtype | None] = [None] * num_slots

    def dtype_of(self, slot: int) -> torch.dtype | None:
        """The 16-bit dtype slot `slot` holds its rows in, or None for float32 rows."""
        return self._host[slot]

    def set(self, slot: int, dtype: torch.dtype | None) -> None:
        if self._host[slot] != dtype:
            self.codes[slot] = self.CODES.index(dtype)
            self._host[slot] = dtype


def narrow_rows(buffer: torch.Tensor, slot: int, dtype: torch.dtype) -> torch.Tensor:
    """Slot `slot` of a float32 slot buffer [S, R, F] seen as 16-bit rows [R, F] of `dtype`:
    the first half of the slot's bytes."""
    _, rank, features = buffer.shape
    return buffer[slot].view(-1).view(dtype)[: rank * features].view(rank, features)


def slot_rows(buffer: torch.Tensor, slot: int, narrow: NarrowSlots | None) -> torch.Tensor:
    """The rows [R, F] slot `slot` of `buffer` [S, R, F] holds, as it holds them."""
    held = None if narrow is None else narrow.dtype_of(slot)
    return buffer[slot] if held is None else narrow_rows(buffer, slot, held)


def gathered_slot_rows(
    buffer: torch.Tensor, token_slots: torch.Tensor, narrow: NarrowSlots | None
) -> torch.Tensor:
    """Each token's slot rows out of `buffer` [S, R, F], widened where its slot holds 16-bit
    ones: [N, R, F] in the buffer's dtype; token_slots: [N] int64 on the buffer's device."""
    rows = buffer.index_select(0, token_slots)
    if narrow is None:
        return rows
    slots, rank, features = buffer.shape
    codes = narrow.codes.index_select(0, token_slots)[:, None, None]  # [N, 1, 1]
    for code, dtype in enumerate(narrow.CODES):
        if dtype is None:
            continue
        halves = buffer.view(slots, -1).view(dtype)[:, : rank * features]  # [S, R * F]
        held = halves.index_select(0, token_slots).view(-1, rank, features).to(buffer.dtype)
        rows = torch.where(codes == code, held, rows)
    return rows


class LoraContext:
    """The per-forward LoRA batch, shared by every wrapped layer of one model, and which slots
    hold a DoRA or bias term in any of them (`termed`)."""

    def __init__(self) -> None:
        self.batch: LoraBatch | None = None
        self.termed = TermedSlots()


class MultiLoraLinear(nn.Module):
    """A projection plus stacked LoRA slot buffers: `y = (base(x) + lora_delta(x)) * scale +
    shift`, the affine term only on slots that have one (`SlotTerms`).

    lora_a: [num_slots, max_rank, in_features]; lora_b: [num_slots, max_rank, out_features],
    in `slot_dtype` (default: the compute dtype `dtype`; narrower slots keep each adapter's
    scaling in `scales`, not in B). Both keep rank-major rows, so a slot of rank r is the
    leading r rows of each buffer. With `narrow_slots`, float32 slots hold a module the adapter
    stores in bf16 or fp16 as rows of that dtype (`narrow`, `narrow_rows`), its scaling in
    `scales`. The
    base projection runs through `BaseLinear`, which keeps the wrapped module as `base.module`.
    """

    lora_a: torch.Tensor
    lora_b: torch.Tensor

    def __init__(
        self,
        base: nn.Linear,
        context: LoraContext,
        num_slots: int,
        max_rank: int,
        dtype: torch.dtype,
        slot_dtype: torch.dtype | None = None,
        narrow_slots: bool = False,
    ) -> None:
        super().__init__()
        self.base = BaseLinear(base)
        self.context = context
        self.in_features = base.in_features
        self.out_features = base.out_features
        device = next(base.parameters()).device
        slot_dtype = slot_dtype or dtype
        self.register_buffer(
            "lora_a", huge_pages.zeros((num_slots, max_rank, self.in_features), slot_dtype, device)
        )
        self.register_buffer(
            "lora_b", huge_pages.zeros((num_slots, max_rank, self.out_features), slot_dtype, device)
        )
        self.narrow = (
            NarrowSlots(num_slots, device) if narrow_slots and slot_dtype == torch.float32 else None
        )
        self._narrower_slots = slot_dtype != dtype
        keeps_scales = self._narrower_slots or self.narrow is not None
        self.scales = SlotScales(num_slots, device) if keeps_scales else None
        self.terms = SlotTerms(num_slots, self.out_features, dtype, device, context.termed)
        # per slot: how many leading rows of lora_a / lora_b may be non-zero (the rest are)
        self._rows_written = [0] * num_slots
        self._base_row_norms_sq: torch.Tensor | None = None  # [out] float64, for DoRA

    @property
    def slot_nbytes(self) -> int:
        """Device bytes one slot of this layer takes."""
        scale = 0 if self.scales is None else self.scales.values[0].nbytes
        flag = 0 if self.narrow is None else self.narrow.codes[0].nbytes
        slot = self.lora_a[0].nbytes + self.lora_b[0].nbytes
        return slot + scale + flag + self.terms.slot_nbytes

    def resolve(self, weights: ModuleWeights) -> ModuleWeights:
        """`weights` with its DoRA and bias terms computed against this layer's base (see
        `slot_terms`). Raises ValueError saying why they cannot be served here."""
        if weights.embedding:
            raise ValueError("lora_embedding_A / _B target an embedding; this is a projection")
        if weights.resolved:  # plain LoRA: nothing to compute against the base
            return weights
        norm = None if weights.magnitude is None else self._merged_norm(weights.a, weights.b)
        return resolve_terms(weights, norm, self.base.module.bias)

    def _merged_norm(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """||W + b^T a|| of each output's row (DoRA's weight norm), W the dequantized base
        weight: expanded through the base's own kernel where it takes a's rows (one small
        GEMM, no dequantization after the first), else formed directly."""
        module = self.base.module
        projected = self.base.project(a.float()) if a.shape[0] else None
        if projected is None:
            return weight_norm(dequantized_weight(module), a, b)
        if self._base_row_norms_sq is None:  # computed once, by whichever thread needs it
            self._base_row_norms_sq = row_norms_squared(dequantized_weight(module))
        return expanded_weight_norm(
            self._base_row_norms_sq, projected, a, b, lambda: dequantized_weight(module)
        )

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
        """a: [r, in]; b: [r, out] with the adapter's scaling `lora_scale` already folded in, or
        without it where `unscaled` (a and b then the adapter's 16-bit values as stored);
        scale, shift: [out] or None; stored_half: the 16-bit dtype (bf16 or fp16) the adapter
        stores a and B (b / lora_scale) in, or None. Slots narrower than the compute dtype, and
        float32 slots holding such values as 16-bit rows (with `narrow_slots`), hold b /
        lora_scale (B as the adapter stores it: exact when it is stored in the rows' dtype) and
        the scaling apart; others hold b with it folded in. copies: where to leave the copies
        of a and b for the caller to run (None: run now)."""
        narrow = stored_half is not None and self.narrow is not None
        r, written = a.shape[0], self._rows_written[slot]
        pending = SlotCopies() if copies is None else copies
        # float32 rows this write fills whole; 16-bit row r (a padding row) shares one with r - 1
        kept = r // 2 if narrow else r
        if kept < written:  # what a previous adapter of higher rank or other rows left
            self.lora_a[slot, kept:written].zero_()
            self.lora_b[slot, kept:written].zero_()
        self._rows_written[slot] = -(-r // 2) if narrow else r
        apart = False  # whether the slot keeps the scaling apart from B
        if self.scales is not None:
            # a zero scaling folded in left B all zeros: keep it
            apart = (narrow or self._narrower_slots) and (unscaled or lora_scale not in (0.0, 1.0))
            b = b / lora_scale if apart and not unscaled else b
            self.scales.set(slot, lora_scale if apart else 1.0)
        if self.narrow is not None:
            self.narrow.set(slot, stored_half if narrow else None)
        fold = lora_scale if unscaled and not apart else None
        pending.add(slot_rows(self.lora_a, slot, self.narrow)[:r], a)  # [r, in] of [R, in]
        pending.add(slot_rows(self.lora_b, slot, self.narrow)[:r], b, fold)  # [r, out] of [R, out]
        self.terms.set_slot(slot, scale, shift)
        if copies is None:
            pending.run()

    def clear_slot(self, slot: int) -> None:
        """Zero the slot: only the rows an adapter wrote (a slot never filled is all zeros)."""
        written = self._rows_written[slot]
        if written:
            self.lora_a[slot, :written].zero_()
            self.lora_b[slot, :written].zero_()
            self._rows_written[slot] = 0
        if self.scales is not None:
            self.scales.set(slot, 1.0)
        if self.narrow is not None:
            self.narrow.set(slot, None)
        self.terms.clear_slot(slot)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., in] -> [..., out]."""
        y = self.base(x)
        batch = self.context.batch
        if batch is None or not batch.any_adapter:
            return y
        flat_y, flat_x = y.view(-1, self.out_features), x.reshape(-1, self.in_features)
        gathered = takes_gathered_form(batch, flat_x, self.lora_a, self.lora_b)
        add_lora_delta_(
            flat_y, flat_x, batch, self.lora_a, self.lora_b,
            gathered=gathered, scales=self.scales, narrow=self.narrow,
            invariant=self.base.invariant,  # its delta as batch-invariant as its base
        )  # fmt: skip
        self.terms.apply_(flat_y, batch, gathered)
        return y


def is_lora_target(module: nn.Module) -> bool:
    """Linear-like modules LoRA can wrap: nn.Linear and its bitsandbytes subclasses."""
    return isinstance(module, nn.Linear)


LoraLayer = MultiLoraLinear | MultiLoraEmbedding


def wrap_lora_targets(
    model: PreTrainedModel,
    context: LoraContext,
    num_slots: int,
    max_rank: int,
    dtype: torch.dtype,
    target_names: tuple[str, ...] = (),
    slot_dtype: torch.dtype | None = None,
    narrow_slots: bool = False,
) -> dict[str, LoraLayer]:
    """Replace every linear projection inside the decoder by a `MultiLoraLinear` (slots in
    `slot_dtype`, default `dtype`; with `narrow_slots`, float32 ones hold modules stored in bf16
    or fp16 as rows of that dtype), and the input embedding by a `MultiLoraEmbedding` (slots in
    `dtype`), in place.

    The output embedding (lm_head) is left alone. `target_names`, when given, restricts wrapping
    to modules whose last name component is listed (e.g. ("q_proj", "v_proj", "embed_tokens")).
    Returns the wrapped layers keyed by their module path in the original model.
    """
    output_embeddings = model.get_output_embeddings()
    input_embeddings = model.get_input_embeddings()
    names = [
        name
        for name, module in model.named_modules()
        if (is_lora_target(module) and module is not output_embeddings)
        or (module is input_embeddings and isinstance(module, nn.Embedding))
    ]
    if target_names:
        names = [name for name in names if name.rsplit(".", 1)[-1] in target_names]
    wrapped: dict[str, LoraLayer] = {}
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        module = getattr(parent, child)
        layer: LoraLayer
        if module is input_embeddings:
            embedding = cast(nn.Embedding, module)
            layer = MultiLoraEmbedding(embedding, context, num_slots, max_rank, dtype)
        else:
            linear = cast(nn.Linear, module)
            layer = MultiLoraLinear(
                linear, context, num_slots, max_rank, dtype, slot_dtype, narrow_slots
            )
        setattr(parent, child, layer)
        wrapped[name] = layer
    return wrapped
