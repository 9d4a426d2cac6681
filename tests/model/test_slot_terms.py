"""DoRA, bias and embedding slots against PEFT's own layers, in one batch with plain LoRA and base.

The oracle for DoRA is PEFT's `DoraLinearLayer` / `DoraEmbeddingLayer` called as PEFT's eval
forward calls them; for LoRA biases and the embedding lookup, PEFT's formulas. Each batch mixes
every kind of slot with base-only rows, through the compiled kernel, the torch loop and the
gathered form, over a dense and an NF4 base.
"""

from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch
from peft.tuners.lora.dora import DoraEmbeddingLayer, DoraLinearLayer
from torch import nn

import loraserve.model.lora as lora_module
from loraserve.model.kernels import native
from loraserve.model.lora import LoraBatch, LoraContext, MultiLoraLinear
from loraserve.model.lora_embedding import MultiLoraEmbedding
from loraserve.model.slot_terms import ModuleWeights, dequantized_weight, weight_norm

IN, OUT, VOCAB, RANK, SLOTS = 64, 96, 50, 4, 6
SCALING = 1.5
ROWS = [0, 1, 2, 3, 4, 5, 0]  # slot of each row; 0 is the base
ROW_TOKENS = 3


def _randn(*shape, seed: int, std: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * std


def _base(quantized: bool) -> nn.Linear:
    dense = nn.Linear(IN, OUT, bias=True)
    with torch.no_grad():
        dense.weight.copy_(_randn(OUT, IN, seed=1, std=0.2))
        dense.bias.copy_(_randn(OUT, seed=2, std=0.5))
    if not quantized:
        return dense
    layer = bnb.nn.Linear4bit(IN, OUT, bias=True, compute_dtype=torch.float32, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(dense.weight.data, requires_grad=False, quant_type="nf4")
    layer.bias = nn.Parameter(dense.bias.data, requires_grad=False)
    return layer.to("cpu")


class Adapter:
    """One adapter as PEFT holds it: lora_A, lora_B (with bias if lora_bias), DoRA magnitude,
    and a trained bias replacing the base's."""

    def __init__(self, seed: int, dora: bool, lora_bias: bool, trained_bias: bool) -> None:
        self.lora_a = nn.Linear(IN, RANK, bias=False)
        self.lora_b = nn.Linear(RANK, OUT, bias=lora_bias)
        with torch.no_grad():
            self.lora_a.weight.copy_(_randn(RANK, IN, seed=seed, std=0.3))
            self.lora_b.weight.copy_(_randn(OUT, RANK, seed=seed + 1, std=0.3))
            if lora_bias:
                self.lora_b.bias.copy_(_randn(OUT, seed=seed + 2, std=0.3))
        self.magnitude = _randn(OUT, seed=seed + 3, std=0.2).abs() + 1.0 if dora else None
        self.bias = _randn(OUT, seed=seed + 4, std=0.3) if trained_bias else None

    def peft(self, base: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """PEFT's eval forward of the wrapped module on x: [n, in] -> [n, out]."""
        original = base.bias.data.clone()
        if self.bias is not None:  # PEFT loads the trained bias into the base layer
            base.bias.data.copy_(self.bias)
        try:
            result = base(x)
            if self.magnitude is None:
                return result + self.lora_b(self.lora_a(x)) * SCALING
            dora = DoraLinearLayer(fan_in_fan_out=False)
            dora.weight = nn.Parameter(self.magnitude.clone())
            return result + dora(
                x, lora_A=self.lora_a, lora_B=self.lora_b, scaling=SCALING, base_layer=base,
                base_result=result,
            )  # fmt: skip
        finally:
            base.bias.data.copy_(original)

    def weights(self) -> ModuleWeights:
        """What the reader makes of the adapter's files."""
        lora_bias = None if self.lora_b.bias is None else self.lora_b.bias.detach() * SCALING
        return ModuleWeights(
            self.lora_a.weight.detach().clone(),
            (self.lora_b.weight.detach().T * SCALING).contiguous(),
            magnitude=self.magnitude,
            bias=self.bias,
            lora_bias=lora_bias,
        )


# slot -> adapter. No DoRA with a lora_B bias: PEFT refuses it (its DoRA norm would add the
# bias to every column of B A), and so does the config schema.
ADAPTERS = {
    1: Adapter(10, dora=True, lora_bias=False, trained_bias=False),
    2: Adapter(20, dora=False, lora_bias=False, trained_bias=False),
    3: Adapter(30, dora=True, lora_bias=False, trained_bias=True),
    4: Adapter(40, dora=False, lora_bias=True, trained_bias=False),
    5: Adapter(50, dora=False, lora_bias=True, trained_bias=True),
}


@pytest.fixture(params=["kernel", "torch-loop", "gathered"])
def path(request, monkeypatch):
    """The CPU's compiled kernel, the per-segment torch loop, or the gathered form a GPU takes
    (delta and slot terms), here on the CPU."""
    if request.param != "kernel":
        monkeypatch.setattr(lora_module, "native", lambda: None)
    if request.param == "gathered":
        monkeypatch.setattr(lora_module, "takes_gathered_form", lambda *_: True)
    return request.param


@pytest.mark.parametrize("quantized", [False, True], ids=["dense", "nf4"])
def test_every_kind_of_slot_matches_peft_in_one_batch(quantized, path):
    base = _base(quantized)
    context = LoraContext()
    layer = MultiLoraLinear(base, context, SLOTS, 8, torch.float32)
    for slot, adapter in ADAPTERS.items():
        w = layer.resolve(adapter.weights())
        assert w.resolved
        layer.set_slot(slot, w.a, w.b, w.scale, w.shift)
    assert layer.terms.scaled == [False, True, False, True, False, False]
    x = _randn(len(ROWS) * ROW_TOKENS, IN, seed=99)
    context.batch = LoraBatch.for_rows(ROWS, [ROW_TOKENS] * len(ROWS), [0] + [RANK] * 5)
    with torch.no_grad():
        y = layer(x)
        for b, slot in enumerate(ROWS):
            rows = slice(b * ROW_TOKENS, (b + 1) * ROW_TOKENS)
            want = base(x[rows]) if slot == 0 else ADAPTERS[slot].peft(base, x[rows])
            # NF4: our base matmul and bitsandbytes' round their outputs to bf16 differently
            tolerance = 2e-2 if quantized else 1e-5
            torch.testing.assert_close(y[rows], want, rtol=tolerance, atol=tolerance)
            if slot:  # the kind matters: the slot is not plain base
                assert (want - base(x[rows])).abs().max() > 0.1


def test_a_cleared_slot_drops_its_terms(path):
    context = LoraContext()
    layer = MultiLoraLinear(_base(False), context, SLOTS, 8, torch.float32)
    for slot in (1, 3):  # slot 1 keeps its terms: the layer still applies terms to every row
        w = layer.resolve(ADAPTERS[slot].weights())
        layer.set_slot(slot, w.a, w.b, w.scale, w.shift)
    layer.clear_slot(3)
    x = _randn(ROW_TOKENS, IN, seed=5)
    context.batch = LoraBatch.for_rows([3], [ROW_TOKENS], [0, 0, 0, RANK, 0, 0])
    with torch.no_grad():
        assert torch.equal(layer(x), layer.base(x))


def test_a_trained_bias_needs_a_base_bias():
    layer = MultiLoraLinear(nn.Linear(IN, OUT, bias=False), LoraContext(), 2, 8, torch.float32)
    with pytest.raises(ValueError, match="base module has none"):
        layer.resolve(ADAPTERS[5].weights())


@pytest.mark.skipif(native() is None, reason="no compiled kernels for this CPU")
@pytest.mark.parametrize("quantized", [False, True], ids=["dense", "nf4"])
def test_doras_norm_through_the_base_kernel_equals_the_merged_rows_norm(quantized):
    """The rescale a DoRA slot gets is magnitude / ||W + B A||, whether the norm is expanded
    through the base's own small-batch kernel (on the CPU) or taken over merged rows."""
    base = _base(quantized)
    layer = MultiLoraLinear(base, LoraContext(), 2, 8, torch.float32)
    weights = ADAPTERS[1].weights()
    assert layer.base.project(weights.a) is not None  # the expanded form is the one taken
    merged = weight_norm(dequantized_weight(base), weights.a, weights.b)
    for _ in range(2):  # the base's row norms are computed by the first call, reused after
        scale = layer.resolve(weights).scale
        torch.testing.assert_close(scale, weights.magnitude / merged, rtol=1e-6, atol=0)


@pytest.mark.skipif(native() is None, reason="no compiled kernels for this CPU")
def test_a_delta_that_nearly_undoes_its_base_row_gets_that_rows_norm_formed_directly():
    base = _base(False)
    layer = MultiLoraLinear(base, LoraContext(), 2, 8, torch.float32)
    a = _randn(RANK, IN, seed=7, std=0.3)
    a[0] = base.weight[5].detach()
    b = _randn(RANK, OUT, seed=8, std=0.01)
    b[:, 5] = 0.0
    b[0, 5] = -(1 - 1e-3)  # row 5 of W + b^T a is a thousandth of W's row 5
    weights = ModuleWeights(a, b, magnitude=torch.ones(OUT))
    merged = weight_norm(base.weight.detach(), a, b)
    assert merged[5] < 2e-3 * base.weight[5].norm()
    scale = layer.resolve(weights).scale
    torch.testing.assert_close(scale, 1 / merged, rtol=1e-5, atol=0)


def test_a_zero_weight_norm_is_refused():
    base = nn.Linear(IN, OUT, bias=False)
    nn.init.zeros_(base.weight)
    layer = MultiLoraLinear(base, LoraContext(), 2, 8, torch.float32)
    zero_b = ModuleWeights(torch.ones(RANK, IN), torch.zeros(RANK, OUT), magnitude=torch.ones(OUT))
    with pytest.raises(ValueError, match="not finite"):
        layer.resolve(zero_b)


# ---- the input embedding ----------------------------------------------------------------


class ScaledEmbedding(nn.Embedding):
    """Gemma's kind of embedding: the lookup times embed_scale."""

    def __init__(self) -> None:
        super().__init__(VOCAB, OUT)
        self.register_buffer("embed_scale", torch.tensor(3.0), persistent=False)

    def forward(self, ids):
        return super().forward(ids) * self.embed_scale


def _embedding_adapter(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's lora_embedding_A [r, vocab] and lora_embedding_B [hidden, r]."""
    return _randn(RANK, VOCAB, seed=seed), _randn(OUT, RANK, seed=seed + 1, std=0.3)


@pytest.mark.parametrize("scaled", [False, True], ids=["plain", "embed-scale"])
def test_embedding_slots_match_peft_with_and_without_dora(scaled):
    torch.manual_seed(0)
    base = ScaledEmbedding() if scaled else nn.Embedding(VOCAB, OUT)
    embed_scale = 3.0 if scaled else 1.0
    context = LoraContext()
    layer = MultiLoraEmbedding(base, context, 3, 8, torch.float32)
    (a1, b1), (a2, b2) = _embedding_adapter(1), _embedding_adapter(2)
    magnitude = _randn(OUT, seed=3, std=0.2).abs() + 1.0
    for slot, a, b, m in ((1, a1, b1, None), (2, a2, b2, magnitude)):
        w = layer.resolve(ModuleWeights(a, (b.T * SCALING).contiguous(), True, magnitude=m))
        layer.set_slot(slot, w.a, w.b, w.scale, w.shift)
    ids = torch.tensor([3, 7, 7, 49, 0, 12, 5, 5, 31])
    slots = [0, 0, 0, 1, 1, 1, 2, 2, 2]
    context.batch = LoraBatch.for_rows(slots, [1] * len(slots), [0, RANK, RANK])
    with torch.no_grad():
        y = layer(ids)
        plain = base(ids[3:6]) + (a1.T[ids[3:6]] @ b1.T) * SCALING * embed_scale
        dora = DoraEmbeddingLayer(fan_in_fan_out=True)
        dora.weight = nn.Parameter(magnitude.clone())
        scale, result = dora(
            ids[6:], lora_A=a2.T, lora_B=b2.T, scaling=SCALING, base_layer=base,
            embed_fn=lambda x, w: nn.functional.embedding(x, w),
        )  # fmt: skip
        rescaled = scale * base(ids[6:]) + result * embed_scale  # PEFT's DoRA embedding variant
    torch.testing.assert_close(y[:3], base(ids[:3]), rtol=0, atol=0)
    torch.testing.assert_close(y[3:6], plain, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y[6:], rescaled, rtol=1e-5, atol=1e-5)


def test_the_saved_copy_of_the_base_embedding_must_be_this_base():
    base = nn.Embedding(VOCAB, OUT)
    layer = MultiLoraEmbedding(base, LoraContext(), 2, 8, torch.float32)
    a, b = _embedding_adapter(1)
    same = ModuleWeights(a, b.T.contiguous(), True, base_copy=base.weight.detach().clone())
    assert layer.resolve(same).base_copy is None
    other = ModuleWeights(a, b.T.contiguous(), True, base_copy=base.weight.detach() + 1)
    with pytest.raises(ValueError, match="differs from this base"):
        layer.resolve(other)
    with pytest.raises(ValueError, match="this is the input embedding"):
        layer.resolve(ModuleWeights(a, b.T.contiguous()))
