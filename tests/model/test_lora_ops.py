"""The batched LoRA delta against its slow reference, and the layer that owns the slot buffers.

Adapter mixes follow the serving patterns that stress a multi-LoRA kernel differently: every
token on one adapter, every row on its own adapter, uniform and zipf-skewed draws, and base-only
rows (slot 0) mixed in. Slots hold heterogeneous ranks zero-padded to the buffers' max rank.
"""

from __future__ import annotations

import random

import pytest
import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from loraserve.model.loading import load_base_model
from loraserve.model.lora import (
    LoraBatch,
    LoraContext,
    MultiLoraEmbedding,
    MultiLoraLinear,
    NarrowSlots,
    SlotScales,
    add_lora_delta_,
    gathered_lora_delta_,
    lora_delta_reference,
    narrow_rows,
    segmented_lora_delta_,
    slot_rows,
    wrap_lora_targets,
)
from loraserve.model.slot_terms import SlotCopies

IN_FEATURES, OUT_FEATURES, MAX_RANK = 48, 40, 16
# slot -> rank; slot 0 is the base model (no adapter). Slot 1, the most frequent under zipf,
# has the smallest rank, so a kernel that took the rank of the first or commonest slot fails.
SLOT_RANKS = [0, 1, 16, 4, 8, 2, 16, 3, 12, 5, 1, 7, 16]
ADAPTER_SLOTS = list(range(1, len(SLOT_RANKS)))
NUM_ROWS = 12

# Largest allowed max|kernel - reference| / max|reference|, per dtype of the kernel's inputs; the
# reference runs in fp32 on the same (rounded) values. bf16 rounds x @ A before it meets B.
TOLERANCE = {torch.float32: 1e-6, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def _zipf(rng: random.Random, n: int) -> list[int]:
    weights = [1.0 / k**1.5 for k in range(1, len(ADAPTER_SLOTS) + 1)]
    return rng.choices(ADAPTER_SLOTS, weights=weights, k=n)


def _distinct(rng: random.Random, n: int) -> list[int]:
    slots = list(ADAPTER_SLOTS)
    rng.shuffle(slots)
    return slots[:n]


def _with_base(rng: random.Random, n: int) -> list[int]:
    # every other row on the base model, the rest on random adapters
    return [0 if i % 2 else rng.choice(ADAPTER_SLOTS) for i in range(n)]


MIXES = {
    "identical": lambda rng, n: [6] * n,
    "distinct": _distinct,
    "uniform": lambda rng, n: rng.choices(ADAPTER_SLOTS, k=n),
    "zipf": _zipf,
    "base-mixed-in": _with_base,
    "base-only": lambda rng, n: [0] * n,
}


def _slot_weights(dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """lora_a [S, R, in], lora_b [S, R, out]: slot s filled up to its rank, zero beyond it."""
    gen = torch.Generator().manual_seed(seed)
    slots = len(SLOT_RANKS)
    lora_a = torch.zeros(slots, MAX_RANK, IN_FEATURES)
    lora_b = torch.zeros(slots, MAX_RANK, OUT_FEATURES)
    for slot, rank in enumerate(SLOT_RANKS):
        lora_a[slot, :rank] = torch.randn(rank, IN_FEATURES, generator=gen) / IN_FEATURES**0.5
        lora_b[slot, :rank] = torch.randn(rank, OUT_FEATURES, generator=gen)
    return lora_a.to(dtype), lora_b.to(dtype)


def _x(num_tokens: int, dtype: torch.dtype, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(num_tokens, IN_FEATURES, generator=gen).to(dtype)  # [N, in]


def _token_slots(row_slots: list[int], row_len: int) -> torch.Tensor:
    return torch.tensor(row_slots).repeat_interleave(row_len)  # [N] int64


# Each form of the delta, as `add_lora_delta_` calls it: the dispatch (on a CPU, the compiled
# kernel; in a 16-bit dtype over widened rows, its fp32 sum added in one rounding), the segment
# loop, and the gathered (BGMV) form that a GPU takes for decode-sized batches, run here on the
# CPU against the same reference.
FORMS = {
    "dispatch": lambda y, x, batch, a, b, scales=None, narrow=None: add_lora_delta_(
        y, x, batch, a, b, gathered=False, scales=scales, narrow=narrow
    ),
    "segmented": segmented_lora_delta_,
    "gathered": lambda y, x, batch, a, b, scales=None, narrow=None: gathered_lora_delta_(
        y, x, batch.token_slots, a, b, scales, narrow
    ),
}


@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("dtype", list(TOLERANCE), ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("row_len", [1, 5], ids=["per-token", "segments"])
@pytest.mark.parametrize("mix", list(MIXES))
def test_add_lora_delta_matches_reference(mix, row_len, dtype, form):
    row_slots = MIXES[mix](random.Random(mix), NUM_ROWS)
    batch = LoraBatch.for_rows(row_slots, [row_len] * len(row_slots), SLOT_RANKS)
    lora_a, lora_b = _slot_weights(dtype)
    x = _x(NUM_ROWS * row_len, dtype)
    base = _x(NUM_ROWS * row_len, dtype, seed=2)[:, :OUT_FEATURES]  # [N, out], as base(x) gives
    y = base.clone()

    got = FORMS[form](y, x, batch, lora_a, lora_b)
    slots = _token_slots(row_slots, row_len)
    assert torch.equal(batch.token_slots, slots)
    want = base.float() + lora_delta_reference(x.float(), slots, lora_a.float(), lora_b.float())

    assert got is y, "the delta is not added in place"
    assert got.shape == (NUM_ROWS * row_len, OUT_FEATURES) and got.dtype == dtype
    error = (got.float() - want).abs().max() / want.abs().max()
    assert error <= TOLERANCE[dtype], f"relative error {error:.2e}"
    on_base = slots == 0
    assert torch.equal(got[on_base], base[on_base]), "tokens on slot 0 changed"
    if mix != "base-only":  # the comparison is not vacuous
        assert (want - base.float()).abs().max() > 0.5


# bf16 rows on bf16 slots run in AMX tiles where the CPU has them: chunks of 8 to 16 tokens
# (kLoraTileMinTokens, kLoraChunkTokens), in_features a multiple of 32, ranks up to 64; the rest
# take the widened path, in the same call. Ranks: one group of 16 or part of one, several, one
# and two expand steps of 32, and past 64; rows: too few for tiles, a part of a tile, a tile,
# a tile and a short tail, a tile and a tile's part, several.
TILE_SLOT_RANKS = [0, 1, 16, 17, 32, 33, 64, 5, 72]


@pytest.mark.parametrize("row_len", [7, 8, 13, 16, 28, 45])
@pytest.mark.parametrize(("in_features", "out_features"), [(64, 40), (96, 16), (128, 71), (48, 33)])
def test_bf16_chunks_match_a_reference_that_rounds_x_a_to_bf16(row_len, in_features, out_features):
    """The delta in bf16 (tiles or widened rows) against x @ A^T rounded to bf16, then @ B in
    fp32, added to y in one rounding: within a unit of y's last place, plus what one unit of
    h's rounding moves (the tiles sum in their own order)."""
    gen = torch.Generator().manual_seed(row_len * 1000 + in_features + out_features)
    max_rank = 80
    lora_a = torch.zeros(len(TILE_SLOT_RANKS), max_rank, in_features)
    lora_b = torch.zeros(len(TILE_SLOT_RANKS), max_rank, out_features)
    for slot, rank in enumerate(TILE_SLOT_RANKS):
        lora_a[slot, :rank] = torch.randn(rank, in_features, generator=gen) / in_features**0.5
        lora_b[slot, :rank] = torch.randn(rank, out_features, generator=gen) / max(rank, 1) ** 0.5
    lora_a, lora_b = lora_a.bfloat16(), lora_b.bfloat16()
    row_slots = [*range(len(TILE_SLOT_RANKS)), 2, 6, 0, 8]
    num_tokens = row_len * len(row_slots)
    x = torch.randn(num_tokens, in_features, generator=gen).bfloat16()
    base = torch.randn(num_tokens, out_features, generator=gen).bfloat16()
    batch = LoraBatch.for_rows(row_slots, [row_len] * len(row_slots), TILE_SLOT_RANKS)

    got = add_lora_delta_(base.clone(), x, batch, lora_a, lora_b, gathered=False)

    slots = _token_slots(row_slots, row_len)
    a, b = lora_a[slots].float(), lora_b[slots].float()  # [N, R, in], [N, R, out]
    h = torch.einsum("ni,nri->nr", x.float(), a).bfloat16().float()
    delta = torch.einsum("nr,nro->no", h, b)
    want = base.float() + delta
    ulp = want.abs().clamp(min=2**-126) * 2**-8  # a unit of bf16's last place, about
    h_ulp = torch.einsum("nr,nro->no", h.abs() * 2**-8, b.abs())
    assert ((got.float() - want).abs() <= ulp + h_ulp).all()
    assert torch.equal(got[slots == 0], base[slots == 0]), "tokens on slot 0 changed"
    assert delta.abs().max() > 0.5  # the comparison is not vacuous


# Slot -> the scaling a bf16 slot keeps apart from B: powers of two and others (0.375 and 3
# are not folded into B without rounding it in bf16).
SLOT_SCALES = [1.0, 0.375, 2.0, 3.0, 0.5, 1.0, 0.1, 4.0, 0.375, 1.5, 2.0, 0.25, 3.0]


@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("row_len", [1, 5], ids=["per-token", "segments"])
@pytest.mark.parametrize("mix", ["distinct", "zipf", "base-mixed-in"])
def test_bf16_slots_with_their_scales_under_fp32_compute_match_the_reference(mix, row_len, form):
    """Slots narrower than x: widened to fp32 where they are read, each slot's scaling applied
    to x @ A^T; as close to the fp32 reference on the same values as fp32 slots are."""
    row_slots = MIXES[mix](random.Random(mix), NUM_ROWS)
    batch = LoraBatch.for_rows(row_slots, [row_len] * len(row_slots), SLOT_RANKS)
    lora_a, lora_b = _slot_weights(torch.bfloat16)
    scales = SlotScales(len(SLOT_RANKS), torch.device("cpu"))
    for slot, scale in enumerate(SLOT_SCALES):
        scales.set(slot, scale)
    x = _x(NUM_ROWS * row_len, torch.float32)
    y = torch.zeros(NUM_ROWS * row_len, OUT_FEATURES)

    got = FORMS[form](y, x, batch, lora_a, lora_b, scales)
    want = lora_delta_reference(x, batch.token_slots, lora_a, lora_b, scales)
    folded = lora_delta_reference(
        x, batch.token_slots, lora_a.float(), lora_b.float() * scales.values[:, None, None]
    )
    assert got.dtype == torch.float32
    assert (got - want).abs().max() / want.abs().max() <= TOLERANCE[torch.float32]
    assert (want - folded).abs().max() / want.abs().max() <= TOLERANCE[torch.float32]
    assert want.abs().max() > 0.5


@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("row_len", [1, 5], ids=["per-token", "segments"])
@pytest.mark.parametrize("mix", ["distinct", "zipf", "base-mixed-in"])
def test_float32_slots_holding_16_bit_rows_match_the_reference(mix, row_len, form):
    """Two slots in three of float32 buffers hold 16-bit rows in the first half of their bytes
    (bf16 and fp16 in turn), the scaling apart: each form reads each slot as it is held, and
    the delta is the one float32 slots give with the same values (widened) and the same
    scalings."""
    row_slots = MIXES[mix](random.Random(mix), NUM_ROWS)
    batch = LoraBatch.for_rows(row_slots, [row_len] * len(row_slots), SLOT_RANKS)
    values_a, values_b = _slot_weights(torch.float32)
    scales = SlotScales(len(SLOT_RANKS), torch.device("cpu"))
    narrow = NarrowSlots(len(SLOT_RANKS), torch.device("cpu"))
    lora_a, lora_b = torch.zeros_like(values_a), torch.zeros_like(values_b)
    for slot, scale in enumerate(SLOT_SCALES):
        half = (None, torch.bfloat16, torch.float16)[slot % 3]
        if half is not None:  # held as 16-bit rows, the scaling apart
            values_a[slot] = values_a[slot].to(half).float()
            values_b[slot] = values_b[slot].to(half).float()
            narrow.set(slot, half)
            scales.set(slot, scale)
            narrow_rows(lora_a, slot, half).copy_(values_a[slot])
            narrow_rows(lora_b, slot, half).copy_(values_b[slot])
        else:  # float32 rows, the scaling folded into B
            values_b[slot] *= scale
            lora_a[slot], lora_b[slot] = values_a[slot], values_b[slot]
    x = _x(NUM_ROWS * row_len, torch.float32)
    y = torch.zeros(NUM_ROWS * row_len, OUT_FEATURES)

    got = FORMS[form](y, x, batch, lora_a, lora_b, scales, narrow)
    want = lora_delta_reference(x, batch.token_slots, values_a, values_b, scales)
    assert (got - want).abs().max() / want.abs().max() <= TOLERANCE[torch.float32]
    assert want.abs().max() > 0.5
    wide_only = FORMS[form](torch.zeros_like(y), x, batch, lora_a, lora_b, scales)
    assert (wide_only - want).abs().max() / want.abs().max() > 0.1  # the codes are read
    swapped = NarrowSlots(len(SLOT_RANKS), torch.device("cpu"))
    for slot in range(len(SLOT_RANKS)):
        half = narrow.dtype_of(slot)
        swapped.set(slot, {torch.bfloat16: torch.float16, torch.float16: torch.bfloat16}.get(half))
    misread = FORMS[form](torch.zeros_like(y), x, batch, lora_a, lora_b, scales, swapped)
    assert (misread - want).abs().max() / want.abs().max() > 0.1  # and which dtype they say


def _runs(row_slots: list[int], row_len: int) -> list[tuple[int, int, int, int]]:
    """Maximal runs of consecutive rows on one adapter: (slot, rank, start, end) in tokens."""
    runs: list[list[int]] = []
    for b, slot in enumerate(row_slots):
        if slot and runs and runs[-1][0] == slot and runs[-1][3] == b * row_len:
            runs[-1][3] = (b + 1) * row_len
        elif slot:
            runs.append([slot, SLOT_RANKS[slot], b * row_len, (b + 1) * row_len])
    return [tuple(run) for run in runs]


@pytest.mark.parametrize("row_len", [1, 3])
@pytest.mark.parametrize("mix", list(MIXES))
def test_for_rows_makes_one_segment_per_run_of_an_adapter(mix, row_len):
    row_slots = MIXES[mix](random.Random(7), NUM_ROWS)
    batch = LoraBatch.for_rows(row_slots, [row_len] * len(row_slots), SLOT_RANKS)
    got = [(g.slot, g.rank, g.start, g.end) for g in batch.segments]
    assert got == _runs(row_slots, row_len)
    if mix == "identical":
        assert got == [(6, 16, 0, NUM_ROWS * row_len)]
    if mix == "base-only":
        assert got == []
    # Rows sorted by slot, as the runner orders them: one segment per distinct adapter.
    ordered = LoraBatch.for_rows(sorted(row_slots), [row_len] * len(row_slots), SLOT_RANKS)
    assert [g.slot for g in ordered.segments] == sorted(set(row_slots) - {0})


# ---- MultiLoraLinear -------------------------------------------------------------------------


def _layer(seed: int = 0) -> tuple[MultiLoraLinear, LoraContext]:
    torch.manual_seed(seed)
    context = LoraContext()
    layer = MultiLoraLinear(
        nn.Linear(IN_FEATURES, OUT_FEATURES), context, len(SLOT_RANKS), MAX_RANK, torch.float32
    )
    lora_a, lora_b = _slot_weights(torch.float32)
    for slot in ADAPTER_SLOTS:
        rank = SLOT_RANKS[slot]
        layer.set_slot(slot, lora_a[slot, :rank], lora_b[slot, :rank])
    return layer, context


def _forward(layer, context, row_slots, row_len, slot_ranks=SLOT_RANKS):
    x = _x(len(row_slots) * row_len, torch.float32).view(len(row_slots), row_len, IN_FEATURES)
    context.batch = LoraBatch.for_rows(row_slots, [row_len] * len(row_slots), slot_ranks)
    try:
        return x, layer(x)  # [B, T, out]
    finally:
        context.batch = None


@pytest.mark.parametrize("row_len", [1, 4])
def test_layer_adds_each_rows_delta_and_slot_zero_is_exactly_base(row_len):
    layer, context = _layer()
    row_slots = [0, 3, 0, 2, 12, 0, 1, 1]
    x, y = _forward(layer, context, row_slots, row_len)

    base = layer.base(x)
    for b, slot in enumerate(row_slots):
        if slot == 0:
            assert torch.equal(y[b], base[b]), f"row {b} on slot 0 is not exactly base(x)"
        else:
            want = base[b] + lora_delta_reference(
                x[b], torch.full((row_len,), slot), layer.lora_a, layer.lora_b
            )
            torch.testing.assert_close(y[b], want, atol=1e-5, rtol=1e-5)
            assert not torch.allclose(y[b], base[b])


@pytest.mark.parametrize("row_slots", [[0], [0, 0, 0]])
def test_layer_all_base_rows_or_no_batch_give_base_exactly(row_slots):
    layer, context = _layer()
    x, y = _forward(layer, context, row_slots, 3)
    assert torch.equal(y, layer.base(x))
    assert torch.equal(layer(x), layer.base(x))  # context.batch is None outside a forward


def test_set_slot_with_lower_rank_clears_what_the_previous_adapter_left():
    layer, context = _layer()
    gen = torch.Generator().manual_seed(3)
    a2 = torch.randn(2, IN_FEATURES, generator=gen)  # [r, in]
    b2 = torch.randn(2, OUT_FEATURES, generator=gen)
    layer.set_slot(2, a2, b2)  # slot 2 held a rank-16 adapter

    assert torch.equal(layer.lora_a[2, :2], a2) and torch.equal(layer.lora_b[2, :2], b2)
    assert not layer.lora_a[2, 2:].any() and not layer.lora_b[2, 2:].any()
    # Even read at the buffers' full padded rank, slot 2 now holds only the rank-2 adapter.
    ranks = [MAX_RANK] * len(SLOT_RANKS)
    x, y = _forward(layer, context, [2, 6], 1, ranks)
    torch.testing.assert_close(y[0, 0], layer.base(x)[0, 0] + (x[0, 0] @ a2.T) @ b2)


def test_clear_slot_zeroes_only_that_slot():
    layer, context = _layer()
    before_a, before_b = layer.lora_a.clone(), layer.lora_b.clone()
    layer.clear_slot(4)

    assert not layer.lora_a[4].any() and not layer.lora_b[4].any()
    others = [s for s in range(len(SLOT_RANKS)) if s != 4]
    assert torch.equal(layer.lora_a[others], before_a[others])
    assert torch.equal(layer.lora_b[others], before_b[others])
    x, y = _forward(layer, context, [4, 3], 1)
    base = layer.base(x)
    assert torch.equal(y[0], base[0])
    assert not torch.allclose(y[1], base[1])


@pytest.mark.parametrize("deferred", [False, True])
def test_a_slot_refilled_at_any_rank_or_cleared_holds_exactly_its_adapter(deferred):
    """Only the rows an earlier adapter wrote are zeroed on a refill: whatever the order of
    ranks and clears, the slot holds the new adapter's rows and zeros past them."""
    layer, _ = _layer()
    gen = torch.Generator().manual_seed(7)
    slot = 3
    for rank in (2, MAX_RANK, 0, 5, 1, None, 4, None, None, MAX_RANK - 1, 3):
        if rank is None:
            layer.clear_slot(slot)
            a, b = torch.zeros(0, IN_FEATURES), torch.zeros(0, OUT_FEATURES)
        else:
            a = torch.randn(rank, IN_FEATURES, generator=gen)
            b = torch.randn(rank, OUT_FEATURES, generator=gen)
            copies = SlotCopies() if deferred else None
            layer.set_slot(slot, a, b, copies=copies)
            if copies is not None:
                copies.run()
        r = a.shape[0]
        assert torch.equal(layer.lora_a[slot, :r], a) and torch.equal(layer.lora_b[slot, :r], b)
        assert not layer.lora_a[slot, r:].any() and not layer.lora_b[slot, r:].any(), rank


def test_set_slot_with_copies_defers_them_and_ends_as_a_direct_fill():
    direct, _ = _layer()
    deferred, _ = _layer()
    gen = torch.Generator().manual_seed(5)
    fills = {2: 3, 5: MAX_RANK}  # slot -> rank: below the buffers' rank, and at it
    copies = SlotCopies()
    for slot, rank in fills.items():
        a, b = torch.randn(rank, IN_FEATURES, generator=gen), torch.randn(rank, OUT_FEATURES)
        direct.set_slot(slot, a, b)
        deferred.set_slot(slot, a, b, copies=copies)
    assert len(copies.destinations) == 4
    assert not torch.equal(deferred.lora_a[5], direct.lora_a[5])  # nothing copied yet
    copies.run()
    assert torch.equal(deferred.lora_a, direct.lora_a)
    assert torch.equal(deferred.lora_b, direct.lora_b)


def test_a_bf16_slot_holds_b_as_stored_and_the_scaling_apart():
    """B comes with the scaling folded in (in fp32, as the adapter's tensors are converted);
    a bf16 slot holds B as the adapter stored it, bit for bit, and the scaling beside it, so
    the layer's output is that of an fp32 slot with the same adapter."""
    torch.manual_seed(0)
    base = nn.Linear(IN_FEATURES, OUT_FEATURES)
    narrow, wide = LoraContext(), LoraContext()
    bf16_layer = MultiLoraLinear(base, narrow, 4, MAX_RANK, torch.float32, torch.bfloat16)
    fp32_layer = MultiLoraLinear(base, wide, 4, MAX_RANK, torch.float32)
    gen = torch.Generator().manual_seed(8)
    stored = {}  # slot -> (a, b) as a bf16 adapter stores them, and its scaling
    for slot, (rank, scale) in {1: (4, 0.375), 2: (MAX_RANK, 3.0), 3: (2, 0.0)}.items():
        a = torch.randn(rank, IN_FEATURES, generator=gen).to(torch.bfloat16)
        b = torch.randn(rank, OUT_FEATURES, generator=gen).to(torch.bfloat16)
        stored[slot] = (a, b, scale)
        folded = b.float() * scale
        bf16_layer.set_slot(slot, a.float(), folded, lora_scale=scale)
        fp32_layer.set_slot(slot, a.float(), folded, lora_scale=scale)

    assert bf16_layer.lora_a.dtype == bf16_layer.lora_b.dtype == torch.bfloat16
    terms = fp32_layer.terms.slot_nbytes
    assert (bf16_layer.slot_nbytes - terms - 4) * 2 == fp32_layer.slot_nbytes - terms
    assert fp32_layer.scales is None and bf16_layer.scales is not None
    for slot, (a, b, scale) in stored.items():
        rank = a.shape[0]
        assert torch.equal(bf16_layer.lora_a[slot, :rank], a)
        if scale:  # a zero scaling leaves B zero, folded, with a scaling of 1
            assert torch.equal(bf16_layer.lora_b[slot, :rank], b)
        assert bf16_layer.scales.of(slot) == (scale or 1.0)
        assert float(bf16_layer.scales.values[slot]) == (scale or 1.0)
    _, got = _forward(bf16_layer, narrow, [1, 2, 0, 3, 2], 3, [0, 4, MAX_RANK, 2])
    _, want = _forward(fp32_layer, wide, [1, 2, 0, 3, 2], 3, [0, 4, MAX_RANK, 2])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.equal(got[0], got[2])

    bf16_layer.clear_slot(2)
    assert bf16_layer.scales.of(2) == float(bf16_layer.scales.values[2]) == 1.0
    assert not bf16_layer.lora_b[2].any()
    a, b, _ = stored[3]  # slot 3's pair into slot 1 at a scaling of 0.5: it replaces 0.375
    bf16_layer.set_slot(1, a.float(), b.float() * 0.5, lora_scale=0.5)
    assert bf16_layer.scales.of(1) == float(bf16_layer.scales.values[1]) == 0.5


@pytest.mark.parametrize("deferred", [False, True])
def test_a_float32_slot_holds_modules_stored_in_16_bits_as_16_bit_rows(deferred):
    """With narrow slots, a module whose a and b / scaling are bf16 or fp16 values goes into
    its slot as rows of that dtype, B as stored and the scaling apart; others as float32 rows,
    the scaling folded. Refilled either way at any rank, from one dtype to another, or cleared,
    the slot holds exactly its adapter and zeros past it (read at the full padded rank, as the
    gathered form reads it), and the layer's output is that of plain float32 slots with the
    same adapter."""
    torch.manual_seed(0)
    base = nn.Linear(IN_FEATURES, OUT_FEATURES)
    held, plain = LoraContext(), LoraContext()
    layer = MultiLoraLinear(base, held, 4, MAX_RANK, torch.float32, narrow_slots=True)
    reference = MultiLoraLinear(base, plain, 4, MAX_RANK, torch.float32)
    assert layer.slot_nbytes == reference.slot_nbytes + 4 + 1  # a scaling and a code
    gen = torch.Generator().manual_seed(9)
    slot = 2
    bf16, fp16 = torch.bfloat16, torch.float16
    fills = [(MAX_RANK, None, 0.375), (3, bf16, 0.375), (MAX_RANK, fp16, 3.0), (5, None, 2.0),
             (7, bf16, 0.1), None, (MAX_RANK - 1, fp16, 1.0), (2, bf16, 0.0), (6, fp16, 0.3),
             (4, None, 0.5), (1, bf16, 3.0)]  # fmt: skip
    for fill in fills:
        if fill is None:
            layer.clear_slot(slot)
            reference.clear_slot(slot)
            assert not layer.lora_a[slot].any() and not layer.lora_b[slot].any()
            assert layer.narrow.dtype_of(slot) is None and layer.scales.of(slot) == 1.0
            assert layer.narrow.codes[slot] == 0
            continue
        rank, half, scale = fill
        a = torch.randn(rank, IN_FEATURES, generator=gen)
        b = torch.randn(rank, OUT_FEATURES, generator=gen)
        if half is not None:
            a, b = a.to(half).float(), b.to(half).float()
        copies = SlotCopies() if deferred else None
        layer.set_slot(slot, a, b * scale, copies=copies, lora_scale=scale, stored_half=half)
        reference.set_slot(slot, a, b * scale, lora_scale=scale)
        if copies is not None:
            copies.run()
        assert layer.narrow.dtype_of(slot) == half
        assert layer.narrow.codes[slot] == {None: 0, bf16: 1, fp16: 2}[half]
        rows_a, rows_b = (
            slot_rows(layer.lora_a, slot, layer.narrow),
            slot_rows(layer.lora_b, slot, layer.narrow),
        )
        assert rows_a.dtype == (half or torch.float32)
        apart = half is not None and scale not in (0.0, 1.0)
        assert layer.scales.of(slot) == (scale if apart else 1.0)
        assert torch.equal(rows_a[:rank].float(), a)
        if scale:  # a zero scaling leaves B zero, folded
            assert torch.equal(rows_b[:rank].float(), b if apart else b * scale)
        assert not rows_a[rank:].any() and not rows_b[rank:].any(), fill
        _, got = _forward(layer, held, [slot, 0, slot], 2, [0, 0, MAX_RANK, 0])
        _, want = _forward(reference, plain, [slot, 0, slot], 2, [0, 0, MAX_RANK, 0])
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("slots", ["compute", "narrow", "bf16"])
@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_a_pair_held_as_stored_fills_each_kind_of_slot_exactly(half, slots):
    """A 16-bit A and an unscaled B as the adapter stores them (`unscaled`: how the host tier
    holds such a pair under fp32 compute): float32 rows get B times the scaling in one float32
    multiply (what converting it to float32 with the scaling folded gives, bit for bit);
    16-bit rows (narrow slots, in the stored dtype, or bf16 slots) get A and B as stored,
    rounded only from fp16 to bf16 slots, with the scaling apart. Refilled and deferred alike,
    the layer's output is that of float32 slots holding the folded float32 form."""
    torch.manual_seed(0)
    base = nn.Linear(IN_FEATURES, OUT_FEATURES)
    held, plain = LoraContext(), LoraContext()
    slot_dtype = torch.bfloat16 if slots == "bf16" else torch.float32
    layer = MultiLoraLinear(
        base, held, 4, MAX_RANK, torch.float32, slot_dtype, narrow_slots=slots == "narrow"
    )
    reference = MultiLoraLinear(base, plain, 4, MAX_RANK, torch.float32)
    gen = torch.Generator().manual_seed(10)
    slot = 3
    for i, (rank, scale) in enumerate([(MAX_RANK, 0.375), (3, 1.0), (5, 0.0), (7, 3.1)]):
        a = torch.randn(rank, IN_FEATURES, generator=gen).to(half)
        b = torch.randn(rank, OUT_FEATURES, generator=gen).to(half)
        copies = SlotCopies() if i % 2 else None
        layer.set_slot(slot, a, b, copies=copies, lora_scale=scale, stored_half=half,
                       unscaled=True)  # fmt: skip
        if copies is not None:
            copies.run()
        apart = slots != "compute"
        rows_a = slot_rows(layer.lora_a, slot, layer.narrow)
        rows_b = slot_rows(layer.lora_b, slot, layer.narrow)
        rows_dtype = {"compute": torch.float32, "narrow": half, "bf16": torch.bfloat16}[slots]
        assert rows_a.dtype == rows_b.dtype == rows_dtype
        assert torch.equal(rows_a[:rank], a.to(rows_a.dtype))
        assert torch.equal(rows_b[:rank], b.to(rows_b.dtype) if apart else b.float() * scale)
        assert not rows_a[rank:].any() and not rows_b[rank:].any()
        if layer.scales is not None:
            assert layer.scales.of(slot) == (scale if apart else 1.0)
            assert layer.scales.values[slot] == torch.tensor(layer.scales.of(slot))
        # the reference holds the values the slot holds, in float32, the scaling folded in
        a_held, b_held = rows_a[:rank].float(), b.to(rows_b.dtype).float()
        reference.set_slot(slot, a_held, b_held * scale, lora_scale=scale)
        _, got = _forward(layer, held, [slot, 0, slot], 2, [0, 0, 0, MAX_RANK])
        _, want = _forward(reference, plain, [slot, 0, slot], 2, [0, 0, 0, MAX_RANK])
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_stored_half_changes_nothing_where_slots_cannot_hold_16_bit_rows():
    """Without narrow slots (or with bf16 buffers) a module stored in bf16 fills the slot as
    any other."""
    torch.manual_seed(0)
    base = nn.Linear(IN_FEATURES, OUT_FEATURES)
    plain = MultiLoraLinear(base, LoraContext(), 2, MAX_RANK, torch.float32)
    bf16_buffers = MultiLoraLinear(
        base, LoraContext(), 2, MAX_RANK, torch.float32, torch.bfloat16, narrow_slots=True
    )
    assert plain.narrow is None and bf16_buffers.narrow is None
    a = torch.randn(4, IN_FEATURES).bfloat16().float()
    b = torch.randn(4, OUT_FEATURES).bfloat16().float()
    plain.set_slot(1, a, b * 0.375, lora_scale=0.375, stored_half=torch.bfloat16)
    assert torch.equal(plain.lora_b[1, :4], b * 0.375) and plain.scales is None
    bf16_buffers.set_slot(1, a, b * 0.375, lora_scale=0.375, stored_half=torch.bfloat16)
    assert torch.equal(bf16_buffers.lora_b[1, :4].float(), b)


def _embedding(num_slots: int = 4) -> MultiLoraEmbedding:
    torch.manual_seed(0)
    return MultiLoraEmbedding(nn.Embedding(30, OUT_FEATURES), LoraContext(), num_slots, 8,
                              torch.float32)  # fmt: skip


@pytest.mark.parametrize("deferred", [False, True])
def test_embedding_slot_refilled_with_a_lower_rank_or_cleared_holds_no_stale_rows(deferred):
    layer = _embedding()
    gen = torch.Generator().manual_seed(6)

    def fill(slot: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        a = torch.randn(rank, 30, generator=gen)  # [r, vocab]
        b = torch.randn(rank, OUT_FEATURES, generator=gen)
        copies = SlotCopies() if deferred else None
        layer.set_slot(slot, a, b, copies=copies)
        if copies is not None:
            copies.run()
        return a, b

    fill(1, 8)
    a, b = fill(1, 3)
    assert torch.equal(layer.lora_a[1, :, :3], a.T) and not layer.lora_a[1, :, 3:].any()
    assert torch.equal(layer.lora_b[1, :3], b) and not layer.lora_b[1, 3:].any()
    assert layer.filled[1]
    fill(2, 8)
    layer.clear_slot(1)
    layer.clear_slot(1)  # already clear
    assert not layer.lora_a[1].any() and not layer.lora_b[1].any() and not layer.filled[1]
    assert layer.lora_a[2].any() and layer.filled[2]


# ---- wrap_lora_targets -----------------------------------------------------------------------

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _tiny_llama() -> nn.Module:
    config = AutoConfig.for_model(
        "llama",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=96,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def _expected_paths(names: tuple[str, ...], layers: int = 2) -> set[str]:
    parent = {n: "self_attn" if n in PROJECTIONS[:4] else "mlp" for n in PROJECTIONS}
    return {f"model.layers.{i}.{parent[n]}.{n}" for i in range(layers) for n in names}


@pytest.mark.parametrize(
    ("target_names", "expected", "embedding"),
    [
        ((), PROJECTIONS, True),
        (("q_proj", "v_proj"), ("q_proj", "v_proj"), False),
        (("down_proj",), ("down_proj",), False),
        (("lm_head", "o_proj"), ("o_proj",), False),  # lm_head is never wrapped, even when named
        (("embed_tokens", "q_proj"), ("q_proj",), True),
    ],
)
def test_wrap_lora_targets_wraps_decoder_projections_and_the_input_embedding(
    target_names, expected, embedding
):
    model = _tiny_llama()
    ids = torch.tensor([[1, 5, 9, 2]])
    with torch.no_grad():
        before = model(ids).logits
    context = LoraContext()
    wrapped = wrap_lora_targets(model, context, 3, 8, torch.float32, target_names)

    embed = {"model.embed_tokens"} if embedding else set()
    assert set(wrapped) == _expected_paths(expected) | embed
    for name, module in model.named_modules():
        if name in embed:
            assert module is wrapped[name] and isinstance(module, MultiLoraEmbedding)
            assert module.lora_a.shape == (3, 96, 8) and module.lora_b.shape == (3, 8, 64)
        elif name in wrapped:
            assert module is wrapped[name] and isinstance(module, MultiLoraLinear)
            assert module.lora_a.shape == (3, 8, module.in_features)
            assert module.lora_b.shape == (3, 8, module.out_features)
        elif isinstance(module, MultiLoraLinear):
            pytest.fail(f"{name} was wrapped but not returned")
    assert type(model.lm_head) is nn.Linear
    leftover = {n for n, m in model.named_modules() if type(m) is nn.Linear} - {"lm_head"}
    assert leftover == {f"{p}.base.module" for p in wrapped if p not in embed} | (
        _expected_paths(PROJECTIONS) - set(wrapped)
    )
    with torch.no_grad():  # the same maths; the compiled kernels may sum in another order
        torch.testing.assert_close(model(ids).logits, before, rtol=1e-5, atol=1e-6)


def test_wrap_lora_targets_wraps_bitsandbytes_layers(model_dirs):
    import bitsandbytes as bnb

    loaded = load_base_model(str(model_dirs["llama"]), "nf4", "fp32", "cpu")
    wrapped = wrap_lora_targets(loaded.model, LoraContext(), 2, 4, torch.float32)

    assert set(wrapped) == _expected_paths(PROJECTIONS) | {"model.embed_tokens"}
    projections = [layer for layer in wrapped.values() if isinstance(layer, MultiLoraLinear)]
    assert all(isinstance(layer.base.module, bnb.nn.Linear4bit) for layer in projections)
    assert not isinstance(loaded.model.lm_head, MultiLoraLinear)
