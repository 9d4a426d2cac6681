"""What a LoRA slot adds beyond the low-rank delta: DoRA's rescale and the adapter's bias terms.

PEFT's forward for one module on one adapter's tokens (eval mode: dropout is off), where
base(x) = x W^T + b0 and lora(x) = x A^T B^T with the scaling folded into B:

- LoRA:  y = base(x) + lora(x) + lb, where lb is lora_B's bias times the scaling
  (`lora_bias=True`);
- DoRA:  y = base(x) + (m - 1) (base(x) - b0) + m lora(x), with m = magnitude / ||W + B A||,
  the norm of each output's row of the merged weight, taken over the dequantized base weight
  and treated as a constant (PEFT detaches it). Never with lb: PEFT refuses the pair;
- a trained bias b1 (`bias="all"` or `"lora_only"`) replaces b0 in both.

Each is `y = (base(x) + lora(x)) * scale + shift` with per-output vectors, computed once when
an adapter is resolved against the base (`resolve_terms`): scale = m (none without DoRA) and
shift = b1 - m b0 + lb (m = 1 without DoRA; absent terms are zero). For the input embedding,
PEFT's DoRA rescales the whole lookup the same way, with no bias.

`SlotTerms` holds those vectors per slot for one layer and applies them to a batch's rows;
`SlotCopies` gathers the copies that fill a slot of every layer, to run them as one call.

Knows nothing about adapter files, names or which adapter is in which slot.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from loraserve.model.bitsandbytes_offline import bnb

import torch
from torch import nn

if TYPE_CHECKING:
    from loraserve.model.lora import LoraBatch

NORM_CHUNK_ROWS = 1024  # rows of the merged weight formed at once for DoRA's norm
# `expanded_weight_norm` forms a row directly when its squared norm is under this fraction of
# ||w||^2 + ||d||^2: elsewhere its error stays within a few float32 roundings (`a W^T` comes
# from a float32 matmul), as does the merged row's own norm.
CANCELLATION = 0.25


@dataclass(frozen=True)
class ModuleWeights:
    """One adapter's tensors for one wrapped module.

    a: [r, in]; b: [r, out] with the scaling `lora_scale` folded in (for the input embedding,
    in is the vocabulary and out the hidden size); embedding: read from PEFT's lora_embedding_A
    / _B.
    As read from the adapter's files a module may also carry, each [out] in float32:
    `magnitude` (DoRA), `bias` (a trained bias replacing the base's) and `lora_bias` (lora_B's
    bias, scaling folded in), and for the embedding `base_copy` [vocab, hidden], the copy of
    the base embedding PEFT saves next to an embedding LoRA. `resolve_terms` turns them into
    `scale` and `shift` ([out], in the compute dtype), which is what a slot holds.
    `stored_half`: the 16-bit dtype (bf16 or fp16) the adapter stores A and B in, so that a and
    b / lora_scale hold its values (float32 slots may then hold them in it, exactly); None for
    one stored in float32, or A and B stored in different dtypes.
    `unscaled`: a and b are the adapter's own 16-bit values (bf16 or fp16, as stored) and b is
    B^T without the scaling, which the slot write applies (`SlotCopies.add`'s `times`) or keeps
    apart: how the host tier holds a plain pair stored in 16 bits under fp32 compute, in half
    the bytes of fp32 and exactly.
    """

    a: torch.Tensor
    b: torch.Tensor
    embedding: bool = False
    magnitude: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    lora_bias: torch.Tensor | None = None
    base_copy: torch.Tensor | None = None
    scale: torch.Tensor | None = None
    shift: torch.Tensor | None = None
    lora_scale: float = 1.0
    stored_half: torch.dtype | None = None
    unscaled: bool = False

    @property
    def resolved(self) -> bool:
        """Whether nothing here still needs the base model to be served."""
        return (
            self.magnitude is None
            and self.bias is None
            and self.lora_bias is None
            and self.base_copy is None
        )

    def _tensors(self) -> dict[str, Any]:
        names = ("a", "b", "magnitude", "bias", "lora_bias", "base_copy", "scale", "shift")
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}

    def storages(self) -> dict[int, int]:
        """The memory under these tensors, storage address -> bytes. A view keeps its whole
        storage alive, so the storage, not the view, is what holding these weights costs."""
        return {
            t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
            for t in self._tensors().values()
        }

    def pinned(self) -> ModuleWeights:
        """The same weights in pinned host memory (for asynchronous copies to CUDA)."""
        return replace(self, **{n: t.pin_memory() for n, t in self._tensors().items()})


@dataclass(frozen=True)
class SlotCopies:
    """Copies into slot buffers gathered from many layers, run as one batched copy (and one
    batched multiply for those scaled on the way): filling a slot of every layer one `copy_`
    at a time costs more in calls than in bytes."""

    destinations: list[torch.Tensor] = field(default_factory=list)
    sources: list[torch.Tensor] = field(default_factory=list)
    scaled: list[torch.Tensor] = field(default_factory=list)
    factors: list[float] = field(default_factory=list)

    def add(
        self, destination: torch.Tensor, source: torch.Tensor, times: float | None = None
    ) -> None:
        """destination <- source, or source * times in the destination's dtype (a widened
        16-bit B gets its scaling as fp32 folds it: one rounding of the exact product)."""
        self.destinations.append(destination)
        self.sources.append(source)
        if times is not None:
            self.scaled.append(destination)
            self.factors.append(times)

    def run(self) -> None:
        """Every copy (asynchronous from pinned memory), then every scaling."""
        if self.destinations:
            torch._foreach_copy_(self.destinations, self.sources, non_blocking=True)
        if self.scaled:
            torch._foreach_mul_(self.scaled, self.factors)


def dequantized_weight(module: nn.Linear) -> torch.Tensor:
    """[out, in]: the base projection's weight as bitsandbytes dequantizes it (as PEFT's DoRA
    reads it), or the weight itself when it is not quantized."""
    weight = module.weight
    if isinstance(module, bnb.nn.Linear4bit):
        state = weight.quant_state  # type: ignore[attr-defined]
        if getattr(state, "packing_format_for_cpu", False):
            raise ValueError("the base weight is in bitsandbytes' CPU packing; it cannot be read")
        return bnb.functional.dequantize_4bit(weight.data, state)
    if isinstance(module, bnb.nn.Linear8bitLt):
        scales: Any = module.state.SCB
        if scales is None:
            scales = weight.SCB  # type: ignore[attr-defined]
        return bnb.functional.int8_vectorwise_dequant(weight.data, scales)
    return weight


def weight_norm(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """||weight + b^T a|| of each row, in float32 on weight's device. weight: [out, in];
    a: [r, in]; b: [r, out] -> [out]. Formed NORM_CHUNK_ROWS rows at a time, never the whole
    merged weight."""
    a32 = a.to(weight.device, torch.float32)
    norms = []
    for start in range(0, weight.shape[0], NORM_CHUNK_ROWS):
        rows = slice(start, start + NORM_CHUNK_ROWS)
        lora = b[:, rows].to(weight.device, torch.float32).T @ a32  # [chunk, in]
        norms.append(torch.linalg.norm(weight[rows].float() + lora, dim=1))
    return torch.cat(norms)


def row_norms_squared(weight: torch.Tensor) -> torch.Tensor:
    """[out, in] -> [out] float64: ||w||^2 of each row, NORM_CHUNK_ROWS rows at a time."""
    chunks = weight.split(NORM_CHUNK_ROWS)
    return torch.cat([chunk.double().square().sum(1) for chunk in chunks])


def expanded_weight_norm(
    row_norms_sq: torch.Tensor,
    projected: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    weight: Callable[[], torch.Tensor],
) -> torch.Tensor:
    """`weight_norm` without forming a merged row: with w the base row of an output and
    d = b^T a its delta, ||w + d||^2 = ||w||^2 + 2 b . (a w) + b^T (a a^T) b, in float64.

    row_norms_sq: [out] ||w||^2 of every base row (`row_norms_squared`); projected: [r, out]
    a W^T (the base's own matmul of a's rows, no bias); a: [r, in]; b: [r, out] -> [out]
    float32. Where the delta nearly undoes its base row, the sum's rounding would show: those
    rows (their squared norm under CANCELLATION of ||w||^2 + ||d||^2) are formed directly from
    `weight()` ([out, in])."""
    a64, b64 = a.double(), b.double()
    cross = (b64 * projected.double()).sum(0)  # [out]: b . (a w)
    delta_sq = ((a64 @ a64.T @ b64) * b64).sum(0)  # [out]: ||d||^2
    norm_sq = row_norms_sq + 2 * cross + delta_sq
    norms = norm_sq.clamp_min(0).sqrt().float()
    unsure = (norm_sq < CANCELLATION * (row_norms_sq + delta_sq)).nonzero().flatten()
    if unsure.numel():
        norms[unsure] = weight_norm(weight()[unsure], a, b[:, unsure])
    return norms


def resolve_terms(
    weights: ModuleWeights, merged_norm: torch.Tensor | None, base_bias: torch.Tensor | None
) -> ModuleWeights:
    """`weights` with its DoRA magnitude and bias terms turned into `scale` and `shift`.

    merged_norm: [out] float32, ||W + B A|| of each output's row (`weight_norm`), needed only
    when the module has a magnitude; base_bias: [out] or None. The terms are computed in
    float32 where the base lives and kept where `weights` lives, in its dtype. Raises
    ValueError saying why they cannot be served.
    """
    if weights.resolved:
        return weights
    if weights.magnitude is not None and weights.lora_bias is not None:
        raise ValueError("DoRA with a lora_B bias: PEFT trains no lora_B bias with DoRA")
    if weights.bias is not None and base_bias is None:
        raise ValueError("the adapter carries a trained bias, but the base module has none")
    device = next((t.device for t in (base_bias, merged_norm) if t is not None), weights.b.device)

    def f32(t: torch.Tensor | None) -> torch.Tensor:
        return torch.zeros((), device=device) if t is None else t.to(device, torch.float32)

    scale = None
    if weights.magnitude is not None:
        if merged_norm is None:
            raise ValueError("DoRA needs the norm of the merged weight")
        scale = f32(weights.magnitude) / merged_norm
    shift = None
    if weights.bias is not None or weights.lora_bias is not None or scale is not None:
        m = 1.0 if scale is None else scale
        b0 = f32(base_bias)
        b1 = b0 if weights.bias is None else f32(weights.bias)
        shift = b1 - m * b0 + f32(weights.lora_bias)
        if not shift.any():
            shift = None
    dtype, home = weights.b.dtype, weights.b.device
    terms: dict[str, Any] = {}
    for name, term in (("scale", scale), ("shift", shift)):
        if term is not None:
            terms[name] = term.to(home, dtype)
            if not torch.isfinite(terms[name]).all():
                what = "DoRA's rescale (magnitude / weight norm)" if name == "scale" else "bias"
                raise ValueError(f"{what} is not finite in {str(dtype).removeprefix('torch.')}")
    return replace(weights, magnitude=None, bias=None, lora_bias=None, base_copy=None, **terms)


class TermedSlots:
    """Which slots hold a DoRA or bias term in any layer of one model, as each layer's
    `SlotTerms` reports its own: the slots a CUDA graph captured without terms cannot serve.
    Written by whichever thread fills slots, read by the engine's."""

    def __init__(self) -> None:
        self._layers: Counter[int] = Counter()  # slot -> layers with a term on it

    def add(self, slot: int) -> None:
        self._layers[slot] += 1

    def remove(self, slot: int) -> None:
        self._layers[slot] -= 1
        if self._layers[slot] <= 0:
            del self._layers[slot]

    def any_of(self, slots: Iterable[int]) -> bool:
        return any(slot in self._layers for slot in slots)


class SlotTerms(nn.Module):
    """Per-slot output affine terms of one layer: rows on slot s become rows * scale[s] +
    shift[s]. scale, shift: [num_slots, out]; a slot without a term skips it, and its rows hold
    the identity (ones, zeros) for the gathered form, which applies every row's term at once.
    `termed`: the model's record of slots with a term in any layer, kept up to date here."""

    scale: torch.Tensor
    shift: torch.Tensor

    def __init__(
        self,
        num_slots: int,
        out_features: int,
        dtype: torch.dtype,
        device: torch.device,
        termed: TermedSlots | None = None,
    ) -> None:
        super().__init__()
        shape = (num_slots, out_features)
        self.register_buffer("scale", torch.ones(shape, dtype=dtype, device=device))
        self.register_buffer("shift", torch.zeros(shape, dtype=dtype, device=device))
        self.scaled = [False] * num_slots
        self.shifted = [False] * num_slots
        self.termed = termed or TermedSlots()

    @property
    def slot_nbytes(self) -> int:
        return self.scale[0].nbytes + self.shift[0].nbytes

    def set_slot(self, slot: int, scale: torch.Tensor | None, shift: torch.Tensor | None) -> None:
        """scale, shift: [out] or None (that term is off for the slot)."""
        self.clear_slot(slot)
        if scale is not None:
            self.scale[slot].copy_(scale, non_blocking=True)
            self.scaled[slot] = True
        if shift is not None:
            self.shift[slot].copy_(shift, non_blocking=True)
            self.shifted[slot] = True
        if scale is not None or shift is not None:
            self.termed.add(slot)

    def clear_slot(self, slot: int) -> None:
        """Turn both terms off for `slot`, its rows back to the identity."""
        if self.scaled[slot] or self.shifted[slot]:
            self.termed.remove(slot)
        if self.scaled[slot]:
            self.scale[slot].fill_(1)
        if self.shifted[slot]:
            self.shift[slot].zero_()
        self.scaled[slot] = self.shifted[slot] = False

    def apply_(self, y: torch.Tensor, batch: LoraBatch, gathered: bool = False) -> None:
        """y: [N, out], updated in place on the rows of each segment whose slot has terms, or
        (gathered) every row at once by its slot's rows, gathered with `batch.token_slots`.
        Costs nothing per segment while no slot of this layer has a term (plain LoRA); a batch
        with `every_term` (a CUDA graph's or a decode record's) applies both terms to every row
        whatever the slots hold now, and one a graph captures without it none (the graph
        serves only slots without terms)."""
        if batch.every_term or batch.in_graph:
            scaled = shifted = gathered = batch.every_term
        else:
            scaled, shifted = any(self.scaled), any(self.shifted)
        if not (scaled or shifted):
            return
        if gathered:
            if scaled:
                y.mul_(self.scale.index_select(0, batch.token_slots))
            if shifted:
                y.add_(self.shift.index_select(0, batch.token_slots))
            return
        for seg in batch.segments:
            rows = y[seg.start : seg.end]
            if self.scaled[seg.slot]:
                rows.mul_(self.scale[seg.slot])
            if self.shifted[seg.slot]:
                rows.add_(self.shift[seg.slot])
