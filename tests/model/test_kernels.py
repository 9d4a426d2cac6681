"""The compiled CPU kernels against their torch references, and the paths that choose them.

Each op must equal its reference up to float32 summation order, on shapes that hit every
remainder of the kernels' blocking (rows not a multiple of the vector width or of a pass,
columns not a multiple of a tile, K not a multiple of the vector width or of a chunk, quantization
blocks smaller and larger than a chunk), for NF4 and FP4, with and without bias and double
quantization. Skipped where this CPU has no build (the torch paths then serve everything).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import bitsandbytes as bnb
import bitsandbytes.functional as bnb_functional
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from loraserve.model import linear
from loraserve.model.attention import attend_context, attend_decode_gathered
from loraserve.model.kernels import build, chosen_variant, native
from loraserve.model.kv_cache import LayerPools, quantize_heads
from loraserve.model.linear import (
    AMX_DENSE_MAX_ROWS,
    AMX_TILE_MIN_ROWS,
    AMX_WIDENED_MAX_ROWS,
    GEMV_BF16_MIN_BLOCK,
    PAIRS_MIN_ROWS,
    SMALL_BATCH_ROWS,
    BaseLinear,
    Packed4bit,
    SharedInputGroup,
    amx_tiles,
    bf16_pairs,
    link_shared_inputs,
    make_batch_invariant,
    matmul_group,
    wrap_projections,
)
from loraserve.model.lora import transposed_bs
from loraserve.model.sampling import score_stats, score_stats_reference
from loraserve.model.slot_terms import dequantized_weight

pytestmark = pytest.mark.skipif(native() is None, reason="no compiled kernels for this CPU")
REPO = Path(__file__).resolve().parents[2]
RTOL, ATOL = 2e-5, 2e-5  # float32, another summation order


def _quantized(out_features: int, in_features: int, quant_type: str, nested: bool, bias: bool,
               blocksize: int = 64):  # fmt: skip
    """A bitsandbytes Linear4bit with random weights, quantized on the CPU, whose forward
    computes in fp32 on every CPU (on AVX512-BF16 ones bitsandbytes would round to bf16)."""
    torch.manual_seed(out_features * 31 + in_features)
    dense = nn.Linear(in_features, out_features, bias=bias)
    layer = bnb.nn.Linear4bit(
        in_features,
        out_features,
        bias=bias,
        compute_dtype=torch.float32,
        compress_statistics=nested,
        quant_type=quant_type,
    )
    layer.weight = bnb.nn.Params4bit(
        dense.weight.data,
        requires_grad=False,
        compress_statistics=nested,
        quant_type=quant_type,
        blocksize=blocksize,
    )
    if bias:
        layer.bias = nn.Parameter(dense.bias.data, requires_grad=False)
    layer.support_avx512bf16_for_cpu = False
    return layer.to("cpu")


def _dequantized(layer: bnb.nn.Linear4bit) -> torch.Tensor:
    return bnb_functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()


@pytest.mark.parametrize("rows", [0, 1, 2, 3, 4, 5, 6, 7, 12, 17, 32, 33, SMALL_BATCH_ROWS])
@pytest.mark.parametrize(("out_features", "in_features"), [(96, 128), (13, 64), (40, 192)])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_linear_4bit_equals_dequantize_then_matmul(rows, out_features, in_features, quant_type):
    layer = _quantized(out_features, in_features, quant_type, nested=False, bias=False)
    p = Packed4bit.of(layer)
    x = torch.randn(rows, in_features)
    got = native().linear_4bit(x, p.packed, p.absmax, p.code, p.blocksize, out_features, None)
    torch.testing.assert_close(got, F.linear(x, _dequantized(layer)), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("blocksize", [32, 256])
@pytest.mark.parametrize("rows", [2, 21, 40])
def test_linear_4bit_with_blocks_smaller_and_larger_than_a_chunk(rows, blocksize):
    layer = _quantized(24, 512, "nf4", nested=False, bias=False, blocksize=blocksize)
    p = Packed4bit.of(layer)
    assert p.blocksize == blocksize
    x = torch.randn(rows, 512)
    got = native().linear_4bit(x, p.packed, p.absmax, p.code, p.blocksize, 24, None)
    torch.testing.assert_close(got, F.linear(x, _dequantized(layer)), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("nested", [False, True], ids=["absmax", "nested"])
@pytest.mark.parametrize(
    ("in_features", "blocksize"), [(384, 64), (512, 128), (512, 256), (320, 64), (384, 32)]
)
def test_one_to_five_rows_equal_dequantize_then_matmul_in_either_decoded_order(
    in_features, blocksize, nested
):
    """With AVX-512, 1-4 rows of weights whose 128 k are whole halves of blocks (K a multiple
    of 128, blocks of a multiple of 64) read 64 bytes of a column a step, a step's two halves
    scaled by their own blocks; the rest (320 k, blocks of 32, 5 rows) 16 bytes a step. A group
    of both kinds takes each weight's x in its own order."""
    layer = _quantized(40, in_features, "nf4", nested=nested, bias=False, blocksize=blocksize)
    other = _quantized(24, in_features, "fp4", nested=nested, bias=False,
                       blocksize=32 if blocksize > 32 else 64)  # fmt: skip
    weights = [Packed4bit.of(layer), Packed4bit.of(other)]
    for rows in range(1, 6):
        x = torch.randn(rows, in_features)
        got = matmul_group(native(), x, weights, [None, None])
        for output, quantized in zip(got, (layer, other), strict=True):
            want = F.linear(x, _dequantized(quantized))
            torch.testing.assert_close(output, want, rtol=RTOL, atol=ATOL)


def test_linear_4bit_refuses_a_blocksize_that_is_not_a_power_of_two():
    rows, out_features, in_features, blocksize = 8, 16, 192, 96
    packed = torch.zeros(out_features * in_features // 2, dtype=torch.uint8)
    absmax = torch.ones(out_features * in_features // blocksize)
    with pytest.raises(RuntimeError, match="power of two"):
        native().linear_4bit(torch.randn(rows, in_features), packed, absmax, torch.zeros(16),
                             blocksize, out_features, None)  # fmt: skip


@pytest.mark.parametrize("nested", [False, True], ids=["plain", "double-quant"])
@pytest.mark.parametrize(
    "rows", [2, 32, 33, SMALL_BATCH_ROWS + 1], ids=["rows", "one-pass", "passes", "dequantize"]
)
def test_base_linear_on_4bit_equals_bitsandbytes(rows, nested):
    layer = _quantized(64, 128, "nf4", nested=nested, bias=True)
    x = torch.randn(1, rows, 128)
    with torch.no_grad():
        want = layer(x)
    got = BaseLinear(layer)(x)
    assert got.shape == want.shape == (1, rows, 64)
    torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("rows", [0, 1, 4, 5, 17, 32, 33, SMALL_BATCH_ROWS])
def test_linear_4bit_group_equals_one_call_per_weight(rows):
    """Weights of different widths (tails of a block of columns), block sizes, double
    quantization and biases, sharing one input: each output exactly as its own call gives it."""
    layers = [
        _quantized(40, 256, "nf4", nested=False, bias=True),
        _quantized(13, 256, "fp4", nested=True, bias=False),
        _quantized(96, 256, "nf4", nested=False, bias=False, blocksize=256),
    ]
    weights = [Packed4bit.of(layer) for layer in layers]
    biases = [None if layer.bias is None else layer.bias.data for layer in layers]
    x = torch.randn(rows, 256)
    got = matmul_group(native(), x, weights, biases)
    for output, weight, bias, layer in zip(got, weights, biases, layers, strict=True):
        assert torch.equal(output, weight.matmul(native(), x, bias))
        want = F.linear(x, _dequantized(layer), bias)
        torch.testing.assert_close(output, want, rtol=RTOL, atol=ATOL)


@pytest.mark.skipif(
    chosen_variant() != build.VARIANTS["avx512"], reason="AVX-512's column-vector path"
)
@pytest.mark.parametrize("rows", [5, 6, 7, 8, 9, 10, 11, 12])
@pytest.mark.parametrize(
    ("in_features", "blocksizes"), [(320, (32, 64, 64)), (768, (256, 128, 64))],
    ids=["k-ends-mid-chunk", "blocks-past-a-chunk"],
)  # fmt: skip
def test_5_to_12_rows_give_the_bits_these_rows_get_in_a_16_row_call(rows, in_features, blocksizes):
    """From 5 to 12 rows the AVX-512 build runs whole blocks of 32 columns with the columns in
    the vectors' lanes; 16 rows run with the rows in them: each output sums the same products
    in the same order. NF4 and FP4, plain and double-quantized scales, blocks smaller and larger
    than a decoded chunk of 128 k, alone and sharing one call; a weight whose width leaves a
    tail of columns takes the other paths, beside them in the same call."""
    shapes = [(64, "nf4", False), (96, "fp4", True), (40, "nf4", False)]
    layers = [
        _quantized(out, in_features, kind, nested=nested, bias=False, blocksize=blocksize)
        for (out, kind, nested), blocksize in zip(shapes, blocksizes, strict=True)
    ]
    weights = [Packed4bit.of(layer) for layer in layers]
    x = torch.randn(16, in_features)
    ops = native()
    for group in (weights[:1], weights[:2]):
        sixteen = matmul_group(ops, x, group, [None] * len(group))
        few = matmul_group(ops, x[:rows].contiguous(), group, [None] * len(group))
        for got, want in zip(few, sixteen, strict=True):
            assert torch.equal(got, want[:rows])
    got = matmul_group(ops, x[:rows].contiguous(), weights, [None] * len(weights))
    for output, layer in zip(got, layers, strict=True):
        want = F.linear(x[:rows], _dequantized(layer))
        torch.testing.assert_close(output, want, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("rows", [17, 33, 65, 18, 40])
def test_a_few_rows_past_a_multiple_of_16_run_as_a_call_of_their_own(rows):
    """The last rows past a multiple of 16, up to 8 (8-lane builds: 1), take the few-rows path
    after the rest instead of a whole vector's work: the first rows get the bits a call for
    them alone gives, the last the bits of theirs, each weight of a shared call alike."""
    lanes = chosen_variant().lanes
    if rows % 16 > (8 if lanes == 16 else 1):
        pytest.skip(f"{rows % 16} rows past a multiple of 16 run in passes with {lanes} lanes")
    layers = [
        _quantized(40, 320, "nf4", nested=False, bias=True),
        _quantized(64, 320, "fp4", nested=True, bias=False, blocksize=32),
    ]
    weights = [Packed4bit.of(layer) for layer in layers]
    biases = [None if layer.bias is None else layer.bias.data for layer in layers]
    x = torch.randn(rows, 320)
    head = rows - rows % 16
    ops = native()
    got = matmul_group(ops, x, weights, biases)
    first = matmul_group(ops, x[:head].contiguous(), weights, biases)
    last = matmul_group(ops, x[head:].contiguous(), weights, biases)
    for output, head_rows, tail_rows, layer, bias in zip(
        got, first, last, layers, biases, strict=True
    ):
        assert torch.equal(output[:head], head_rows)
        assert torch.equal(output[head:], tail_rows)
        want = F.linear(x, _dequantized(layer), bias)
        torch.testing.assert_close(output, want, rtol=RTOL, atol=ATOL)


class _Attention(nn.Module):
    """q, k and v of one input, as transformers' attention modules call them."""

    def __init__(self) -> None:
        super().__init__()
        self.q_proj = BaseLinear(_quantized(64, 128, "nf4", nested=False, bias=True))
        self.k_proj = BaseLinear(_quantized(32, 128, "nf4", nested=True, bias=False))
        self.v_proj = BaseLinear(_quantized(32, 128, "fp4", nested=False, bias=False))
        self.o_proj = BaseLinear(_quantized(128, 64, "nf4", nested=False, bias=False))


def _unlinked(attention: _Attention, x: torch.Tensor) -> list[torch.Tensor]:
    layers = (attention.q_proj, attention.k_proj, attention.v_proj)
    return [F.linear(x, _dequantized(p.module), p.bias()) for p in layers]


def test_linked_projections_each_take_their_own_output_of_one_shared_call():
    attention = _Attention()
    (group,) = link_shared_inputs(attention)
    assert group.members == [attention.q_proj, attention.k_proj, attention.v_proj]
    assert attention.o_proj.group is None
    for rows in (3, 32, SMALL_BATCH_ROWS + 1):
        x = torch.randn(1, rows, 128)
        want = _unlinked(attention, x)
        for order in ((0, 1, 2), (2, 0, 1), (1, 1, 0, 2)):  # any order; one member twice
            layers = (attention.q_proj, attention.k_proj, attention.v_proj)
            got = {i: layers[i](x) for i in order}
            for i, output in got.items():
                torch.testing.assert_close(output, want[i], rtol=RTOL, atol=ATOL)


def test_a_linked_projection_called_with_another_input_computes_for_that_input():
    attention = _Attention()
    SharedInputGroup([attention.q_proj, attention.k_proj, attention.v_proj])
    x, other = torch.randn(4, 128), torch.randn(4, 128)
    attention.q_proj(x)  # leaves k's and v's outputs for x pending
    want = _unlinked(attention, other)
    torch.testing.assert_close(attention.k_proj(other), want[1], rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(attention.v_proj(other), want[2], rtol=RTOL, atol=ATOL)


def test_shared_input_groups_link_only_4bit_projections_of_one_input_size():
    attention = _Attention()
    with pytest.raises(ValueError, match="one input size"):
        SharedInputGroup([attention.q_proj, attention.o_proj])
    attention.k_proj = BaseLinear(nn.Linear(128, 32))  # fp32: the group is q and v
    (group,) = link_shared_inputs(attention)
    assert group.members == [attention.q_proj, attention.v_proj]


def test_every_projection_runs_through_a_base_linear_and_wrappers_keep_theirs():
    """A LoRA layer keeps its BaseLinear as a child; projections nothing wrapped get one."""
    model = nn.Sequential()
    model.add_module("mlp", nn.Module())
    model.mlp.gate_proj = nn.Sequential(BaseLinear(_quantized(64, 128, "nf4", False, False)))
    model.mlp.up_proj = _quantized(64, 128, "nf4", nested=False, bias=False)
    model.mlp.down_proj = nn.Linear(64, 128)
    assert wrap_projections(model) == 2
    assert wrap_projections(model) == 0
    assert isinstance(model.mlp.up_proj, BaseLinear) and isinstance(model.mlp.down_proj, BaseLinear)
    (group,) = link_shared_inputs(model)
    assert group.members == [model.mlp.gate_proj[0], model.mlp.up_proj]
    x = torch.randn(5, 128)
    want = F.linear(x, _dequantized(model.mlp.up_proj.module))
    model.mlp.gate_proj(x)
    torch.testing.assert_close(model.mlp.up_proj(x), want, rtol=RTOL, atol=ATOL)


def test_a_4bit_base_keeps_its_layout_through_a_bf16_forward():
    """bitsandbytes would repack the weight at this forward on AVX512-BF16 CPUs (then DoRA's
    weight norms could not read it); elsewhere it never does."""
    torch.manual_seed(0)
    layer = bnb.nn.Linear4bit(128, 64, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(torch.randn(64, 128), requires_grad=False, quant_type="nf4")
    layer = layer.to("cpu").eval()
    before = _dequantized(layer)
    BaseLinear(layer)(torch.randn(SMALL_BATCH_ROWS + 1, 128, dtype=torch.bfloat16))  # its forward
    assert Packed4bit.of(layer) is not None
    assert torch.equal(dequantized_weight(layer), before)


def _compute_in(dtype: torch.dtype, out_features: int = 64, blocksize: int = 64) -> BaseLinear:
    """A 4-bit projection of 128 inputs with a bias, computing in `dtype`."""
    torch.manual_seed(out_features)
    layer = bnb.nn.Linear4bit(128, out_features, bias=True, compute_dtype=dtype, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(
        torch.randn(out_features, 128), requires_grad=False, quant_type="nf4", blocksize=blocksize
    )
    layer.bias = nn.Parameter(torch.randn(out_features).to(dtype), requires_grad=False)
    return BaseLinear(layer.to("cpu").eval())


def _bf16_kernel_min_rows(blocksize: int = 64) -> int | None:
    """The fewest bf16 rows of a 4-bit weight with blocks of `blocksize` that `BaseLinear`
    sends to the bf16 kernel here (None: it sends none)."""
    if amx_tiles():
        return AMX_TILE_MIN_ROWS
    if not linear.bf16_pairs_take_4bit():
        return None
    return 1 if blocksize >= GEMV_BF16_MIN_BLOCK else PAIRS_MIN_ROWS


@pytest.mark.skipif(not Path("/proc/cpuinfo").exists(), reason="no /proc/cpuinfo here")
def test_the_cpu_vendor_is_read_from_linux():
    vendor = linear.cpu_vendor()
    assert vendor and vendor == vendor.strip()
    assert f": {vendor}\n" in Path("/proc/cpuinfo").read_text()


@pytest.fixture(params=["amd", "intel"])
def pairs_vendor(request, monkeypatch):
    """Routing as on an AMD CPU, whose pair dot products take 4-bit weights' bf16 rows, and as
    on an Intel one without tiles, which widens them: the two part only where the kernels
    multiply by pair dot products (`bf16_pairs()`: AVX512-BF16, no tiles)."""
    takes = request.param == "amd" and bf16_pairs()
    monkeypatch.setattr(linear, "bf16_pairs_take_4bit", lambda: takes)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_16_bit_rows_take_the_4bit_kernel_widened_up_to_their_limit(dtype, pairs_vendor):
    """Decode-sized rows in a 16-bit compute dtype: the fp32 kernel's output on the widened
    rows, rounded once; more rows than the limit (32 with AMX; bf16 rows from the bf16 kernel's
    minimum go to it where it runs, up to SMALL_BATCH_ROWS): bitsandbytes' own forward. Blocks
    of 32 k: without tiles, on AMD, the bf16 kernel takes those from PAIRS_MIN_ROWS rows; on
    Intel it takes none."""
    base = _compute_in(dtype, blocksize=32)
    kernel_min = _bf16_kernel_min_rows(blocksize=32) if dtype == torch.bfloat16 else None
    limit = AMX_WIDENED_MAX_ROWS if amx_tiles() else SMALL_BATCH_ROWS
    if kernel_min is not None:
        limit = kernel_min - 1
    for rows in (1, min(5, limit), limit):
        x = torch.randn(1, rows, 128).to(dtype)
        got = base(x)
        assert got.dtype == dtype and got.shape == (1, rows, 64)
        assert torch.equal(got, base(x.float()).to(dtype))
    x = torch.randn((SMALL_BATCH_ROWS if kernel_min is not None else limit) + 1, 128).to(dtype)
    with torch.no_grad():
        assert torch.equal(base(x), base.module(x))


bf16_kernel = pytest.mark.skipif(
    not (amx_tiles() or bf16_pairs()), reason="no bf16 kernel here (AMX tiles or AVX512-BF16)"
)


def _in_bf16_kernel(
    x: torch.Tensor, layers: list, biases: list | None = None
) -> list[torch.Tensor]:
    weights = [Packed4bit.of(layer) for layer in layers]
    return matmul_group(native(), x, weights, biases or [None] * len(layers))


@bf16_kernel
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [False, True], ids=["plain", "double-quant"])
@pytest.mark.parametrize("blocksize", [32, 64, 128, 256, 512])
def test_the_bf16_kernel_decodes_the_weight_to_bf16_as_bitsandbytes_rounds_it(
    quant_type, nested, blocksize
):
    """Rows of the identity pick the weight's columns out exactly: every output is the bf16
    weight that bitsandbytes' dequantize, rounded to bf16, gives (times one, plus zeros). 88
    columns: the last block of 32 is 24 wide; 512 k: two calls of SMALL_BATCH_ROWS rows, two
    whole chunks of 256 k in tiles, one to eight steps of 32 k to a scale."""
    layer = _quantized(88, 512, quant_type, nested, bias=False, blocksize=blocksize)
    want = _dequantized(layer).to(torch.bfloat16)
    identity = torch.eye(512, dtype=torch.bfloat16)
    for first in range(0, 512, SMALL_BATCH_ROWS):
        (got,) = _in_bf16_kernel(identity[first : first + SMALL_BATCH_ROWS], [layer])
        assert torch.equal(got, want[:, first : first + SMALL_BATCH_ROWS].T)
    for rows in (1, 3, 5, 6, 8):  # k in the lanes up to 6 rows (without tiles), then folded
        (got,) = _in_bf16_kernel(identity[100 : 100 + rows], [layer])
        assert torch.equal(got, want[:, 100 : 100 + rows].T)


@bf16_kernel
@pytest.mark.parametrize(
    "rows", [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 16, 17, 32, 33, 48, 64, 100, SMALL_BATCH_ROWS]
)
@pytest.mark.parametrize(("out_features", "in_features"), [(96, 128), (13, 64), (40, 192)])
@pytest.mark.parametrize("blocksize", [32, 64])
def test_the_bf16_kernel_sums_bf16_products_in_fp32_and_rounds_once(
    rows, out_features, in_features, blocksize
):
    """One pass of 32 rows or up to eight, the last of 16 rows or fewer; without tiles, up to 6
    rows with k in the lanes (blocks of 64) or up to 8 folded four or two lanes to a row (blocks
    of 32); any tail of columns; bias added before rounding."""
    layer = _quantized(
        out_features, in_features, "nf4", nested=False, bias=True, blocksize=blocksize
    )
    x = torch.randn(rows, in_features).to(torch.bfloat16)
    bias = layer.bias.data
    (got,) = _in_bf16_kernel(x, [layer], [bias])
    assert got.dtype == torch.bfloat16 and got.shape == (rows, out_features)
    weight = _dequantized(layer).to(torch.bfloat16).float()
    want = F.linear(x.float(), weight, bias)
    # fp32 sums in another order, then one rounding to bf16 (at most half of 2^-7 relative)
    torch.testing.assert_close(got.float(), want, rtol=2**-8, atol=1e-4)


@bf16_kernel
def test_the_bf16_kernel_on_a_group_equals_each_weight_alone():
    layers = [
        _quantized(40, 256, "nf4", nested=False, bias=False),
        _quantized(13, 256, "fp4", nested=True, bias=False),
        _quantized(96, 256, "nf4", nested=False, bias=False, blocksize=256),
    ]
    x = torch.randn(33, 256).to(torch.bfloat16)
    for layer, got in zip(layers, _in_bf16_kernel(x, layers), strict=True):
        assert torch.equal(got, _in_bf16_kernel(x, [layer])[0])


@bf16_kernel
def test_the_bf16_kernel_refuses_more_rows_than_a_call_takes():
    layer = _quantized(16, 64, "nf4", nested=False, bias=False)
    with pytest.raises(RuntimeError, match=f"at most {SMALL_BATCH_ROWS} rows"):
        _in_bf16_kernel(torch.randn(SMALL_BATCH_ROWS + 1, 64).to(torch.bfloat16), [layer])


@bf16_kernel
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 6, 17, 32, 33, 64, SMALL_BATCH_ROWS])
@pytest.mark.parametrize(("out_features", "in_features"), [(96, 128), (13, 64), (40, 192)])
def test_the_bf16_kernel_multiplies_a_bf16_weight_as_it_is_stored(rows, out_features, in_features):
    """Rows of the identity give the weight's bits back; random rows the fp32 sums of the
    exact products, rounded once, bias added before; any tail of columns."""
    torch.manual_seed(rows)
    weight = torch.randn(out_features, in_features).to(torch.bfloat16)
    bias = torch.randn(out_features)
    identity = torch.eye(in_features, dtype=torch.bfloat16)[:rows]
    got = native().linear_bf16(identity, weight, None)
    assert torch.equal(got, weight[:, : len(identity)].T)
    x = torch.randn(rows, in_features).to(torch.bfloat16)
    got = native().linear_bf16(x, weight, bias)
    assert got.dtype == torch.bfloat16 and got.shape == (rows, out_features)
    want = F.linear(x.float(), weight.float(), bias)
    torch.testing.assert_close(got.float(), want, rtol=2**-8, atol=1e-4)
    with pytest.raises(RuntimeError, match="multiple of 32"):
        native().linear_bf16(x[:, :-16].contiguous(), weight[:, :-16].contiguous(), None)


@bf16_kernel
def test_a_bf16_weight_runs_in_the_bf16_kernel_within_its_row_limits():
    """With AMX tiles from one row to AMX_DENSE_MAX_ROWS; by pair dot products from one row to
    SMALL_BATCH_ROWS; torch's bf16 GEMM past them."""
    torch.manual_seed(3)
    layer = nn.Linear(128, 40, bias=True).to(torch.bfloat16)
    base = BaseLinear(layer)
    high = AMX_DENSE_MAX_ROWS if amx_tiles() else SMALL_BATCH_ROWS
    for rows in (1, high):
        x = torch.randn(rows, 128).to(torch.bfloat16)
        got = base(x[None])
        assert got.shape == (1, rows, 40) and got.dtype == torch.bfloat16
        want = native().linear_bf16(x, layer.weight, base.bias())
        assert torch.equal(got[0], want)
    x = torch.randn(high + 1, 128).to(torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(base(x), layer(x))


@bf16_kernel
def test_bf16_rows_from_the_kernel_minimum_to_the_small_batch_limit_run_in_the_bf16_kernel(
    pairs_vendor,
):
    """Alone and linked as one shared-input group: each output as its own kernel call gives
    it (where `BaseLinear` sends 4-bit weights' bf16 rows to the kernel at all)."""
    if _bf16_kernel_min_rows() is None:
        pytest.skip("an Intel CPU without tiles widens them (the test above)")
    projections = [_compute_in(torch.bfloat16, width) for width in (64, 32, 32)]
    SharedInputGroup(projections)
    for rows in (_bf16_kernel_min_rows(), 40, SMALL_BATCH_ROWS):
        x = torch.randn(1, rows, 128).to(torch.bfloat16)
        for projection in (projections[1], projections[0], projections[2]):
            got = projection(x)
            assert got.dtype == torch.bfloat16 and got.shape == (1, rows, projection.out_features)
            (alone,) = _in_bf16_kernel(x[0], [projection.module], [projection.bias()])
            assert torch.equal(got[0], alone)


@pytest.mark.parametrize("rows", [0, 1, 5, 12, 13, 17, 30, 32, 33, 49, 64, 65, SMALL_BATCH_ROWS])
@pytest.mark.parametrize(("out_features", "in_features"), [(7, 100), (25, 64), (12, 3), (30, 300)])
def test_linear_f32_equals_f_linear(rows, out_features, in_features):
    torch.manual_seed(rows)
    x, w, b = torch.randn(rows, in_features), torch.randn(out_features, in_features), None
    if rows % 2:
        b = torch.randn(out_features)
    got = native().linear_f32(x, w, b)
    torch.testing.assert_close(got, F.linear(x, w, b), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("rows", [1, 4, 5, 24, 25, 32, 33, 49, 64, 70, SMALL_BATCH_ROWS])
@pytest.mark.parametrize(("out_features", "in_features"), [(7, 100), (25, 64), (30, 300), (13, 37)])
def test_linear_f32_of_a_bf16_weight_gives_the_bits_of_its_fp32_values(
    rows, out_features, in_features
):
    """Widened as it is read: the same sums, bit for bit, as the fp32 weight of those values."""
    torch.manual_seed(rows + out_features)
    x = torch.randn(rows, in_features)
    narrow = torch.randn(out_features, in_features).to(torch.bfloat16)
    bias = torch.randn(out_features) if rows % 2 else None
    got = native().linear_f32(x, narrow, bias)
    assert torch.equal(got, native().linear_f32(x, narrow.float(), bias))


@pytest.mark.parametrize("rows", [5, 6, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_f32_rows_in_a_half_vector_give_the_bits_of_a_whole_one(rows, dtype):
    """A pass of at most 8 rows keeps its sums in vectors of 8 lanes (AVX-512): each row's
    output has the bits it gets in a pass of 16 lanes, here beside more rows."""
    torch.manual_seed(rows)
    x, w = torch.randn(12, 300), torch.randn(30, 300).to(dtype)
    alone = native().linear_f32(x[:rows], w, None)
    assert torch.equal(alone, native().linear_f32(x, w, None)[:rows])


def _paged_context(lengths, kv_heads, head_dim, block_size, seed=0):
    """Pools with each row's context in scattered blocks: (k_pool, v_pool, tables [R, B])."""
    gen = torch.Generator().manual_seed(seed)
    blocks = max(-(-n // block_size) for n in lengths)
    num_blocks = 1 + len(lengths) * blocks
    order = torch.randperm(num_blocks - 1, generator=gen) + 1
    tables = order.reshape(len(lengths), blocks).to(torch.int32)
    shape = (num_blocks * block_size, kv_heads, head_dim)
    return torch.randn(shape, generator=gen), torch.randn(shape, generator=gen), tables


KV_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# What the attention kernels read: those, and int8 codes with their scales.
POOL_DTYPES = pytest.mark.parametrize(
    "pool_dtype", [*KV_DTYPES, torch.int8], ids=["fp32", "bf16", "fp16", "int8"]
)


def _held_as(k_pool, v_pool, dtype):
    """fp32 pools as `dtype` holds them (`LayerPools`): rounded to it, or int8 codes with their
    scales."""
    if dtype != torch.int8:
        return LayerPools(k_pool.to(dtype), v_pool.to(dtype))
    (key_codes, key_scales), (value_codes, value_scales) = map(quantize_heads, (k_pool, v_pool))
    return LayerPools(key_codes, value_codes, key_scales, value_scales)


def _scales(pools):
    """The kernels' keywords for `pools`' scales (None unless int8 codes)."""
    return {"k_scales": pools.key_scales, "v_scales": pools.value_scales}


def _attended_alone(q, pools, table, length, block_size, window, scale):
    """One decode row's query q [H, D] over its context of `length` positions, gathered out of
    the pools through its block table and widened to fp32, by SDPA: [H, D]."""
    position = torch.arange(length)
    slots = table.long()[position // block_size] * block_size + position % block_size
    k, v = pools.gathered(slots, torch.float32)
    return attend_context(q[None], k, v, length - 1, window, scale)[0]


@POOL_DTYPES
@pytest.mark.parametrize("window", [0, 5])
# Groups of q heads over a kv head: 1; 4; 2 with D past whole vectors; 4 past 16 heads; 3 over
# D = 8 (the tail alone); 8 (two kv heads in a block of 16 heads); 6 (scores in runs of 2,
# values in runs of 6); 7 and 5 (scores head by head, values in runs of the whole group).
@pytest.mark.parametrize(
    ("heads", "kv_heads", "head_dim"),
    [
        (4, 4, 32),
        (8, 2, 64),
        (6, 3, 40),
        (20, 5, 128),
        (3, 1, 8),
        (16, 2, 64),
        (12, 2, 48),
        (14, 2, 64),
        (15, 3, 32),
    ],
)
def test_paged_decode_attention_equals_sdpa_over_the_gathered_context(
    heads, kv_heads, head_dim, window, pool_dtype
):
    """16-bit pools are widened exactly as they are read, int8 codes scaled: the same sums as
    fp32 pools of their values (which `attend_context` is given here), up to the summation
    order."""
    lengths, block_size = [1, 4, 5, 17, 40], 4
    k_pool, v_pool, tables = _paged_context(lengths, kv_heads, head_dim, block_size)
    pools = _held_as(k_pool, v_pool, pool_dtype)
    q = torch.randn(len(lengths), heads, head_dim)
    scale = head_dim**-0.5
    lens = torch.tensor(lengths, dtype=torch.int32)
    got = native().paged_decode_attention(
        q, pools.keys, pools.values, tables, lens, block_size, window, scale, **_scales(pools)
    )
    gathered = attend_decode_gathered(q, pools, tables, lens, block_size, window, scale)
    for r, n in enumerate(lengths):
        want = _attended_alone(q[r], pools, tables[r], n, block_size, window, scale)
        torch.testing.assert_close(got[r], want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(gathered[r], want, rtol=1e-5, atol=1e-5)


@POOL_DTYPES
@pytest.mark.parametrize("window", [0, 300])
def test_long_decode_rows_are_attended_in_parts_whatever_the_batch_around_them(window, pool_dtype):
    """Rows longer than 64 positions are split into parts of equal length but the last (no
    fewer than hold 64 positions each, up to 4; more for rows past 1,024, each part at most
    256) that threads share and merged after: equal to SDPA over the whole context, and each
    row's output the same bits alone as in the batch (the parts depend on its length, not on
    the rows beside it)."""
    lengths = [700, 3, 257, 64, 65, 1100, 513]
    block_size, heads, kv_heads, head_dim = 16, 8, 2, 32
    k_pool, v_pool, tables = _paged_context(lengths, kv_heads, head_dim, block_size, seed=5)
    pools = _held_as(k_pool, v_pool, pool_dtype)
    lens = torch.tensor(lengths, dtype=torch.int32)
    q = torch.randn(len(lengths), heads, head_dim)
    scale = head_dim**-0.5

    def attend(rows):
        return native().paged_decode_attention(
            q[rows], pools.keys, pools.values, tables[rows], lens[rows], block_size, window,
            scale, **_scales(pools),
        )  # fmt: skip

    got = attend(slice(None))
    for r, n in enumerate(lengths):
        want = _attended_alone(q[r], pools, tables[r], n, block_size, window, scale)
        torch.testing.assert_close(got[r], want, rtol=1e-5, atol=1e-5)
        assert torch.equal(attend(slice(r, r + 1))[0], got[r])


@pytest.mark.parametrize("query_dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_paged_decode_attention_of_16_bit_strided_queries_gives_the_widened_queries_bits(
    query_dtype,
):
    """Queries in a 16-bit dtype, seen through a transpose (as the model's projection leaves
    them): bit for bit the fp32 kernel's output over the widened, contiguous queries, rounded
    once to the queries' dtype; and fp32 queries through a transpose as contiguous ones."""
    lengths, block_size, heads, head_dim = [1, 6, 23], 4, 4, 32
    k_pool, v_pool, tables = _paged_context(lengths, 2, head_dim, block_size, seed=3)
    k_pool, v_pool = k_pool.to(torch.bfloat16), v_pool.to(torch.bfloat16)
    lens = torch.tensor(lengths, dtype=torch.int32)
    query = torch.randn(heads, len(lengths), head_dim)  # [H, R, D], as the model has it
    q = query.to(query_dtype).transpose(0, 1)  # [R, H, D], rows not contiguous
    assert not q.is_contiguous()
    attend = native().paged_decode_attention
    got = attend(q, k_pool, v_pool, tables, lens, block_size, 0, head_dim**-0.5)
    want = attend(q.float().contiguous(), k_pool, v_pool, tables, lens, block_size, 0,
                  head_dim**-0.5)  # fmt: skip
    assert got.dtype == query_dtype
    assert torch.equal(got.view(torch.int16), want.to(query_dtype).view(torch.int16))
    strided = attend(query.transpose(0, 1), k_pool, v_pool, tables, lens, block_size, 0, 0.2)
    contiguous = attend(query.transpose(0, 1).contiguous(), k_pool, v_pool, tables, lens,
                        block_size, 0, 0.2)  # fmt: skip
    assert torch.equal(strided, contiguous)


# Prefill rows (count, start): a new prompt of 2 tokens; one past a 32-lane tile; a chunk after
# a cached prefix; chunks whose context spans several 64-position steps of the kernel; a prompt's
# last token alone after a cached prefix (few pairs: worked per kv head).
PREFILL_SPANS = [(2, 0), (33, 0), (5, 7), (17, 40), (40, 200), (1, 150)]


def _prefill_batch(spans, heads, kv_heads, head_dim, block_size, query_dtype=torch.float32):
    """q [N + 2, H, D] (two rows that are no prefill row's, last), the pools, and the rows'
    tables as the kernel takes them: (q, k_pool, v_pool, tables, firsts, counts, starts)."""
    k_pool, v_pool, tables = _paged_context([c + s for c, s in spans], kv_heads, head_dim,
                                            block_size)  # fmt: skip
    counts = torch.tensor([c for c, _ in spans])
    firsts = torch.cumsum(counts, 0) - counts
    starts = torch.tensor([s for _, s in spans])
    q = torch.randn(int(counts.sum()) + 2, heads, head_dim).to(query_dtype)
    return q, k_pool, v_pool, tables, firsts, counts, starts


def every_prefill_case(test):
    """Every pool dtype, window and (heads, kv heads, head dim) shape the prefill tests take."""
    for mark in (
        pytest.mark.parametrize(("heads", "kv_heads", "head_dim"),
                                [(4, 4, 32), (8, 2, 64), (6, 3, 40), (7, 1, 20)]),
        pytest.mark.parametrize("window", [0, 5, 64]),
        POOL_DTYPES,
    ):  # fmt: skip
        test = mark(test)
    return test


@every_prefill_case
def test_paged_prefill_attention_equals_sdpa_over_the_gathered_context(
    heads, kv_heads, head_dim, window, pool_dtype
):
    """Each prefill row's queries over its context read from the pools in place (16-bit pools
    widened exactly, int8 codes scaled): SDPA's causal attention over the gathered context, up
    to the summation order; rows that are no prefill row's are left as they were."""
    block_size, scale = 4, head_dim**-0.5
    q, k_pool, v_pool, tables, firsts, counts, starts = _prefill_batch(
        PREFILL_SPANS, heads, kv_heads, head_dim, block_size
    )
    pools = _held_as(k_pool, v_pool, pool_dtype)
    out = torch.full_like(q, 7.0)
    native().paged_prefill_attention_(
        q, out, pools.keys, pools.values, tables, firsts, counts, starts, block_size, window,
        scale, **_scales(pools),
    )  # fmt: skip
    for r, (count, start) in enumerate(PREFILL_SPANS):
        position = torch.arange(start + count)
        slots = tables[r].long()[position // block_size] * block_size + position % block_size
        k, v = pools.gathered(slots, torch.float32)
        rows = slice(int(firsts[r]), int(firsts[r]) + count)
        want = attend_context(q[rows], k, v, start, window, scale)
        torch.testing.assert_close(out[rows], want, rtol=1e-5, atol=1e-5)
    assert torch.equal(out[-2:], torch.full_like(out[-2:], 7.0))


@every_prefill_case
def test_paged_prefill_attention_gives_a_query_the_same_bits_in_any_chunk(
    heads, kv_heads, head_dim, window, pool_dtype
):
    """A chunk of 40 tokens after 110 cached, worked as one row (a lane per query), and its last
    tokens as rows of their own (few pairs: a kv head's at a time, the positions in the lanes):
    each query's output has the same bits, so batch_invariant holds however a prompt is
    chunked."""
    block_size, scale = 4, head_dim**-0.5
    q, k_pool, v_pool, tables, _, _, _ = _prefill_batch([(40, 110)], heads, kv_heads, head_dim,
                                                        block_size)  # fmt: skip
    pools = _held_as(k_pool, v_pool, pool_dtype)
    attend = native().paged_prefill_attention_

    def attended(spans):
        """out for rows (first query, count) of the chunk, each at its own start."""
        out = torch.zeros_like(q)
        firsts = torch.tensor([first for first, _ in spans])
        counts = torch.tensor([count for _, count in spans])
        attend(q, out, pools.keys, pools.values, tables.expand(len(spans), -1).contiguous(),
               firsts, counts, firsts + 110, block_size, window, scale,
               **_scales(pools))  # fmt: skip
        return out

    whole = attended([(0, 40)])
    split = attended([(39, 1), (38, 1), (36, 2), (33, 3), (0, 33)])
    assert torch.equal(split[:40], whole[:40])


@pytest.mark.parametrize("query_dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_paged_prefill_attention_of_16_bit_strided_queries_gives_the_widened_queries_bits(
    query_dtype,
):
    """Queries in a 16-bit dtype seen through a transpose (as the model's projection leaves
    them): bit for bit the fp32 kernel's output over the widened, contiguous queries, rounded
    once to the queries' dtype; fp32 queries through a transpose as contiguous ones."""
    block_size, heads, head_dim = 4, 4, 32
    q, k_pool, v_pool, tables, firsts, counts, starts = _prefill_batch(
        PREFILL_SPANS, heads, 2, head_dim, block_size
    )
    k_pool, v_pool = k_pool.to(torch.bfloat16), v_pool.to(torch.bfloat16)
    rows = (tables, firsts, counts, starts, block_size, 0, head_dim**-0.5)
    attend = native().paged_prefill_attention_

    def attended(queries):
        out = torch.zeros(queries.shape, dtype=queries.dtype)
        attend(queries, out, k_pool, v_pool, *rows)
        return out

    strided = q.transpose(0, 1).contiguous().transpose(0, 1)  # [N, H, D], heads outermost
    assert not strided.is_contiguous()
    got = attended(strided.to(query_dtype))
    want = attended(strided.to(query_dtype).float().contiguous()).to(query_dtype)
    assert torch.equal(got.view(torch.int16), want.view(torch.int16))
    assert torch.equal(attended(strided), attended(q))


def test_paged_prefill_attention_refuses_rows_outside_the_queries_or_their_tables():
    q, k_pool, v_pool, tables, firsts, counts, starts = _prefill_batch([(3, 0), (2, 5)], 2, 2, 8, 4)
    attend = native().paged_prefill_attention_
    out = torch.empty_like(q)
    with pytest.raises(RuntimeError, match="outside q or its block table"):
        attend(q, out, k_pool, v_pool, tables, firsts, counts + 10, starts, 4, 0, 1.0)
    with pytest.raises(RuntimeError, match="outside q or its block table"):
        attend(q, out, k_pool, v_pool, tables, firsts, counts, starts + 100, 4, 0, 1.0)


def other_variants() -> list[str]:
    """The builds this CPU can run besides its own: the 16-lane logic in AVX2 instructions
    everywhere, and the AVX2 build on a CPU with AVX-512."""
    host = build.host_variant()
    if host is None:
        return []
    return [name for name in ("avx2", "avx2-16") if name != host.name]


@pytest.mark.slow
@pytest.mark.skipif(build.host_variant() is None, reason="no AVX2")
def test_the_other_variants_equal_their_references(every_variant_built):
    """This module's comparisons and the int8 head's against every other build this CPU runs
    (`other_variants`), at once, each in a process of its own, on the session's build of every
    variant: an AVX-512 machine tests what an AVX2-only one runs, and an AVX2 machine the logic
    AVX-512 machines run. A use of a build touches its folder: each folder is dated back first,
    to show that the run loaded its own variant."""
    assert every_variant_built.returncode == 0, every_variant_built.stderr
    env = dict(os.environ, XDG_CACHE_HOME=str(every_variant_built.cache_home))
    runs, folders = {}, {}
    for name in other_variants():
        (library,) = [
            path
            for path in every_variant_built.kernels.rglob(f"loraserve_cpu_{name}.so")
            if path.stat().st_size > 0
        ]
        folders[name] = library.parent
        os.utime(folders[name], (1e9, 1e9))
        runs[name] = subprocess.Popen(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__,
             "tests/model/test_int8_output.py",
             "-k", "not kernels_are_off and not other_variants and not tiles_turned_off"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env=dict(env, LORASERVE_KERNELS=name), cwd=REPO,
        )  # fmt: skip
    try:
        for name, run in runs.items():
            output, _ = run.communicate(timeout=900)
            assert run.returncode == 0, f"{name}: {output[-3000:]}"
            assert " passed" in output, f"{name}: {output[-3000:]}"
            assert folders[name].stat().st_mtime > 1e9, f"{name} unused"
    finally:
        for run in runs.values():
            run.kill()
            run.wait()


@pytest.mark.slow
@pytest.mark.skipif(native() is None or not amx_tiles(), reason="no AMX tiles here to turn off")
def test_with_the_tiles_turned_off_the_pair_dot_products_equal_their_references():
    """With LORASERVE_AMX=off (any case) the bf16 ops take AVX512-BF16's pair dot products, as
    on a CPU without tiles (AMD Zen 4 and 5), and this module's comparisons and the int8 head's
    pass there too, in a process of their own: an AMX machine tests those paths."""
    env = dict(os.environ, LORASERVE_AMX="Off")
    paths = subprocess.run(
        [sys.executable, "-c", "from loraserve.model.linear import amx_tiles, bf16_pairs; "
         "print(amx_tiles(), bf16_pairs())"],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=300,
    )  # fmt: skip
    assert paths.stdout.split() == ["False", "True"], paths.stderr[-3000:]
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__,
         "tests/model/test_int8_output.py",
         "-k", "not kernels_are_off and not other_variants and not tiles_turned_off"],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:]
    assert " passed" in result.stdout


@pytest.mark.slow
def test_the_torch_paths_serve_when_kernels_are_off():
    """With LORASERVE_KERNELS=off the runner's ragged batches still equal full forwards."""
    env = dict(os.environ, LORASERVE_KERNELS="off")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         "tests/model/test_kv_cache.py", "-k", "matches_full_forward or chunks"],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:]
    assert " passed" in result.stdout


@pytest.mark.parametrize("slots_held", ["fp32", "bf16", "fp32-and-16-bit-rows"])
@pytest.mark.parametrize(("in_features", "out_features"), [(64, 37), (40, 100), (8, 3)])
def test_lora_delta_kernel_equals_reference_over_long_and_short_segments(
    in_features, out_features, slots_held
):
    """Segments longer than a chunk of 16 tokens, rows not a multiple of the 4-row block,
    output widths with vector and scalar tails, ranks from 1 to the slot buffer's maximum;
    slots in float32 with the scaling folded in, in bfloat16 with a scaling per slot, or
    float32 slots of which some hold bf16 or fp16 rows in the first half of their bytes
    (`narrow`: 1 bf16, 2 fp16)."""
    torch.manual_seed(in_features)
    slots, max_rank = 5, 16
    slot_dtype = torch.bfloat16 if slots_held == "bf16" else torch.float32
    lora_a = torch.randn(slots, max_rank, in_features).to(slot_dtype)
    lora_b = torch.randn(slots, max_rank, out_features).to(slot_dtype)
    values_a, values_b = lora_a.float().clone(), lora_b.float().clone()  # each slot, widened
    narrow = None
    if slots_held == "fp32-and-16-bit-rows":
        narrow = torch.tensor([0, 1, 0, 2, 1], dtype=torch.uint8)
        for slot in narrow.nonzero().flatten().tolist():
            half = (torch.bfloat16, torch.float16)[int(narrow[slot]) - 1]
            for buffer, values in ((lora_a, values_a), (lora_b, values_b)):
                values[slot] = values[slot].to(half).float()
                rows = buffer[slot].view(-1).view(half)[: values[slot].numel()]
                rows.copy_(values[slot].flatten())
    bf16 = slots_held != "fp32"
    scales = torch.tensor([1.0, 0.375, 2.0, 1.0, 0.1]) if bf16 else None
    segments = [
        (0, 37, 2, 16),
        (37, 38, 4, 1),
        (40, 45, 1, 3),
        (45, 80, 3, 5),
        (80, 99, 4, 10),
        (99, 101, 1, 8),
    ]  # start, end, slot, rank: every remainder of the shrink's 3- and 6-rank blocks
    n = segments[-1][1]
    x, y = torch.randn(n, in_features), torch.randn(n, out_features)
    want = y.clone()
    for start, end, slot, rank in segments:
        shrunk = x[start:end] @ values_a[slot, :rank].T
        scale = 1.0 if scales is None else float(scales[slot])
        want[start:end] += (shrunk * scale) @ values_b[slot, :rank]
    starts, ends, slot_ids, ranks = (torch.tensor(column) for column in zip(*segments))
    native().lora_delta_(x, y, lora_a, lora_b, starts, ends, slot_ids, ranks, scales, narrow)
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-4)
    if slots_held == "bf16":
        with pytest.raises(RuntimeError, match="only float32 slots hold 16-bit rows"):
            native().lora_delta_(x, y, lora_a, lora_b, starts, ends, slot_ids, ranks, scales,
                                 torch.zeros(slots, dtype=torch.uint8))  # fmt: skip


@pytest.mark.parametrize("slot_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("row_dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize(("in_features", "out_features"), [(48, 37), (40, 100)])
def test_lora_delta_kernel_on_16_bit_rows_adds_the_fp32_delta_in_one_rounding(
    in_features, out_features, row_dtype, slot_dtype
):
    """16-bit x and y: bit for bit, the fp32 kernel's delta over the widened rows added to the
    widened y and rounded once (what torch's y.add_(delta) gives), chunk tails and all; a NaN
    in y stays a NaN (whose bits torch's own conversions do not agree on). in_features not a
    multiple of 32: AMX tiles, which round x @ A^T to bf16, do not take these rows (see
    test_lora_ops for the chunks they take)."""
    torch.manual_seed(out_features)
    lora_a = torch.randn(4, 8, in_features).to(slot_dtype)
    lora_b = torch.randn(4, 8, out_features).to(slot_dtype)
    scales = torch.tensor([1.0, 0.375, 2.0, 1.0])
    starts, ends, slots, ranks = (torch.tensor(c) for c in zip((0, 21, 3, 8), (21, 23, 1, 1),
                                                               (23, 40, 2, 5)))  # fmt: skip
    x = torch.randn(40, in_features).to(row_dtype)
    y = torch.randn(40, out_features).to(row_dtype)
    y[22, 3] = float("nan")
    delta = torch.zeros(40, out_features)
    native().lora_delta_(x.float(), delta, lora_a, lora_b, starts, ends, slots, ranks, scales)
    want = (y.float() + delta).to(row_dtype)
    native().lora_delta_(x, y, lora_a, lora_b, starts, ends, slots, ranks, scales)
    assert torch.equal(y.isnan(), want.isnan()) and y.isnan().sum() == 1
    finite = ~want.isnan()
    assert torch.equal(y[finite].view(torch.int16), want[finite].view(torch.int16))
    with pytest.raises(RuntimeError, match="share a dtype"):
        native().lora_delta_(x, y.float(), lora_a, lora_b, starts, ends, slots, ranks, scales)


SHAPES = [(2816, 16), (1024, 64), (13, 9), (8, 8), (7, 3), (0, 4), (5, 0)]


def test_transpose_scaled_equals_the_strided_copy():
    """Exactly the torch path's values (one float32 multiply each) on tiles and their edges,
    each B with its own scale, all as views of one buffer."""
    bs = [torch.randn(*shape) for shape in SHAPES]
    bs += [torch.randn(40, 12).to(torch.bfloat16), torch.randn(12, 40).t()]  # any dtype, strides
    scales = [0.37 * (i + 1) for i in range(len(bs))]
    got = native().transpose_scaled(bs, scales)
    assert len(got) == len(bs)
    for b, scale, t in zip(bs, scales, got):
        assert t.shape == (b.shape[1], b.shape[0]) and t.is_contiguous()
        assert t.dtype == torch.float32
        assert torch.equal(t, b.float().t().contiguous().mul_(scale))
    assert len({t.untyped_storage().data_ptr() for t in got}) == 1
    assert transposed_bs([], []) == []  # the op needs a tensor to dispatch on


@pytest.mark.parametrize("pool_dtype", KV_DTYPES, ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize(("tokens", "kv_heads", "head_dim"), [(1, 1, 1), (7, 2, 17), (300, 4, 64)])
def test_kv_write_equals_index_copy_from_the_projections_strided_output(
    tokens, kv_heads, head_dim, pool_dtype
):
    torch.manual_seed(tokens)
    projected = torch.randn(tokens, kv_heads, head_dim)  # as the projection's view leaves it
    states = projected.transpose(0, 1).to(pool_dtype)  # [kv_heads, tokens, head_dim], strided
    slots = torch.randperm(2 * tokens + 3)[:tokens]
    pool = torch.randn(2 * tokens + 3, kv_heads, head_dim).to(pool_dtype)
    want = pool.clone().index_copy_(0, slots, projected.to(pool_dtype))
    native().kv_write_(pool, slots, states)
    assert torch.equal(pool, want)
    with pytest.raises(RuntimeError, match="outside"):
        native().kv_write_(pool, torch.full((tokens,), pool.shape[0]), states)
    with pytest.raises(RuntimeError, match="pool's dtype"):
        native().kv_write_(pool, slots, states.to(torch.float64))


@pytest.mark.parametrize("states_dtype", KV_DTYPES, ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize(("tokens", "kv_heads", "head_dim"), [(1, 1, 1), (7, 2, 17), (300, 4, 64)])
def test_kv_write_int8_quantizes_as_quantize_heads_bit_for_bit(
    tokens, kv_heads, head_dim, states_dtype
):
    """The compiled quantizer against torch's: the same codes and scales, for heads of zeros,
    holding a NaN or an infinity as well (their codes 0, their scales 0, NaN and infinity)."""
    torch.manual_seed(tokens)
    projected = torch.randn(tokens, kv_heads, head_dim) * 4
    projected[0, 0] = 0
    if tokens > 1:
        projected[1, -1, 0], projected[-1, 0, -1] = float("nan"), float("-inf")
    states = projected.transpose(0, 1).to(states_dtype)  # [kv_heads, tokens, head_dim], strided
    slots = torch.randperm(2 * tokens + 3)[:tokens]
    pool = torch.randint(-127, 128, (2 * tokens + 3, kv_heads, head_dim), dtype=torch.int8)
    scales = torch.rand(2 * tokens + 3, kv_heads)
    codes, head_scales = quantize_heads(projected.to(states_dtype))
    want_pool = pool.clone().index_copy_(0, slots, codes)
    want_scales = scales.clone().index_copy_(0, slots, head_scales)
    native().kv_write_int8_(pool, scales, slots, states)
    assert torch.equal(pool, want_pool)
    torch.testing.assert_close(scales, want_scales, rtol=0, atol=0, equal_nan=True)
    assert head_scales[0, 0] == 0 and not codes[0, 0].any()
    if tokens > 1:
        assert head_scales[1, -1].isnan() and head_scales[-1, 0].isinf()
        assert not codes[1, -1].any() and not codes[-1, 0].any()
    with pytest.raises(RuntimeError, match="outside"):
        native().kv_write_int8_(pool, scales, torch.full((tokens,), pool.shape[0]), states)
    with pytest.raises(RuntimeError, match=r"\[S, KVH\]"):
        native().kv_write_int8_(pool, scales[1:], slots, states)


def test_quantized_heads_read_back_within_half_a_step_of_their_scale():
    """Each element of a head comes back (code times scale) within half its head's step, the
    largest magnitude exactly."""
    states = torch.randn(50, 3, 64) * torch.rand(50, 3, 1) * 10
    codes, scales = quantize_heads(states)
    back = codes.float() * scales.unsqueeze(-1)
    assert ((back - states).abs() <= scales.unsqueeze(-1) / 2 * (1 + 1e-6)).all()
    largest = states.abs().amax(-1, keepdim=True)
    assert torch.allclose(back.abs().amax(-1, keepdim=True), largest, rtol=1e-6)


def test_attention_over_int8_pools_refuses_them_without_their_scales():
    lengths, block_size = [3, 5], 4
    k_pool, v_pool, tables = _paged_context(lengths, 2, 16, block_size)
    pools = _held_as(k_pool, v_pool, torch.int8)
    q, lens = torch.randn(2, 2, 16), torch.tensor(lengths, dtype=torch.int32)
    attend = native().paged_decode_attention
    with pytest.raises(RuntimeError, match="need k_scales"):
        attend(q, pools.keys, pools.values, tables, lens, block_size, 0, 0.25)
    with pytest.raises(RuntimeError, match="go together"):
        attend(q, pools.keys, pools.values, tables, lens, block_size, 0, 0.25,
               k_scales=pools.key_scales)  # fmt: skip
    with pytest.raises(RuntimeError, match="only int8 pools"):
        attend(q, k_pool, v_pool, tables, lens, block_size, 0, 0.25, **_scales(pools))
    with pytest.raises(RuntimeError, match=r"\[S, KVH\]"):
        attend(q, pools.keys, pools.values, tables, lens, block_size, 0, 0.25,
               k_scales=pools.key_scales[1:], v_scales=pools.value_scales)  # fmt: skip


@pytest.mark.parametrize("rows", [1, 5, 300])
@pytest.mark.parametrize("dim", [1, 15, 16, 17, 1000, 1024])
def test_rms_norm_equals_llama_rms_norm(rows, dim):
    torch.manual_seed(rows * dim)
    norm = LlamaRMSNorm(dim, eps=1e-5)
    norm.weight.data = torch.randn(dim)
    x = torch.randn(rows, dim) * 3
    got = native().rms_norm(x, norm.weight, norm.variance_epsilon)
    torch.testing.assert_close(got, norm(x), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("dim", [15, 16, 17, 1024])
def test_rms_norm_in_16_bits_rounds_where_llama_rms_norm_rounds(dim, dtype):
    """The normalised row rounded to the dtype before the weight multiplies it, the product
    rounded again: transformers' values but where the sum of squares, in another order, moves
    a value across a rounding boundary (one unit in the last place)."""
    torch.manual_seed(dim)
    norm = LlamaRMSNorm(dim, eps=1e-5).to(dtype)
    norm.weight.data = torch.randn(dim).to(dtype)
    x = (torch.randn(300, dim) * 3).to(dtype)
    got, want = native().rms_norm(x, norm.weight, norm.variance_epsilon), norm(x)
    assert got.dtype == dtype
    ulp = 2.0**-7 if dtype == torch.bfloat16 else 2.0**-10  # at the top of a binade; twice below
    torch.testing.assert_close(got.float(), want.float(), rtol=2 * ulp, atol=1e-6)
    assert (got == want).float().mean() > 0.99
    with pytest.raises(RuntimeError, match="x's dtype"):
        native().rms_norm(x, norm.weight.float(), norm.variance_epsilon)


@pytest.mark.parametrize("vocab", [1, 7, 8, 17, 32_000])
def test_score_stats_equals_argmax_amax_and_logsumexp(vocab):
    """The first maximum (also across lanes and in the tail), NaN as the largest, rows of
    -infinity, +infinity, ties, and log-sum-exp up to float32 rounding."""
    torch.manual_seed(vocab)
    rows = [torch.randn(vocab) * 8 for _ in range(6)]
    inf, nan = float("inf"), float("nan")
    rows[1][vocab // 2 :] = -inf  # some tokens ruled out
    rows[2][:] = -inf  # nothing left
    rows[3][vocab - 1] = inf  # +infinity in the tail
    rows[4][vocab // 3] = nan
    rows[4][vocab - 1] = nan  # the first NaN wins
    top = rows[5].max() + 1
    rows[5][vocab - 1] = top
    rows[5][vocab // 2] = top  # a tie: the first index wins
    scores = torch.stack(rows)
    got, want = score_stats(scores), score_stats_reference(scores)
    assert torch.equal(got.argmax, want.argmax)
    torch.testing.assert_close(got.max, want.max, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(got.logsumexp, want.logsumexp, rtol=1e-6, atol=1e-6, equal_nan=True)


def test_score_stats_of_large_and_tiny_spreads():
    """exp underflows to (nearly) nothing far below the max and the sum stays exact near it."""
    scores = torch.tensor([[0.0, -1e3, -87.5, -0.1], [1e30, 1e30, -1e30, 0.0]])
    got, want = score_stats(scores), score_stats_reference(scores)
    assert torch.equal(got.argmax, want.argmax)
    torch.testing.assert_close(got.logsumexp, want.logsumexp, rtol=1e-6, atol=1e-6)


# ---- batch invariance: a row's outputs the same whatever rows share its call ----------------

# Row counts of every path a call may take otherwise: the GEMV (1-6), the column vectors (6-12),
# one pass (to 32), tails past 16 split off or not, the outer products past a pass, and more
# rows than the small-batch limit.
INVARIANT_ROWS = [1, 2, 3, 4, 5, 6, 7, 12, 16, 17, 18, 21, 22, 33, 40, 64, 65, 300]


def _alone_and_together(call, x: torch.Tensor) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """call(rows) of every row of x alone, stacked, and of x's first m rows for each m of
    INVARIANT_ROWS."""
    alone = torch.cat([call(x[i : i + 1]) for i in range(x.shape[0])])
    return alone, {m: call(x[:m]) for m in INVARIANT_ROWS}


@pytest.mark.parametrize(
    ("out_features", "in_features", "blocksize"),
    [(96, 128, 64), (13, 64, 64), (64, 256, 256), (40, 192, 32)],
)
@pytest.mark.parametrize("nested", [False, True], ids=["absmax", "nested"])
def test_invariant_4bit_rows_get_the_bits_they_get_alone(
    out_features, in_features, blocksize, nested
):
    """Weights the column vectors take (32 | N) and do not, blocks smaller and larger than a
    chunk, double-quantized scales; with a bias; the sums still dequantize-then-matmul's."""
    layer = _quantized(out_features, in_features, "nf4", nested, bias=True, blocksize=blocksize)
    p, bias = Packed4bit.of(layer), layer.bias.float()
    x = torch.randn(max(INVARIANT_ROWS), in_features)
    alone, together = _alone_and_together(lambda rows: p.matmul(native(), rows, bias, True), x)
    torch.testing.assert_close(alone, F.linear(x, _dequantized(layer), bias), rtol=RTOL, atol=ATOL)
    for rows, y in together.items():
        assert torch.equal(y, alone[:rows]), f"{rows} rows"


def test_invariant_4bit_group_gives_each_weight_the_bits_of_its_rows_alone():
    weights = [Packed4bit.of(_quantized(n, 128, "nf4", False, False)) for n in (96, 13, 64)]
    x = torch.randn(max(INVARIANT_ROWS), 128)
    for i, weight in enumerate(weights):
        alone = torch.cat([weight.matmul(native(), x[r : r + 1], None, True) for r in range(300)])
        for rows in INVARIANT_ROWS:
            group = matmul_group(native(), x[:rows], weights, [None] * 3, True)
            assert torch.equal(group[i], alone[:rows]), f"weight {i}, {rows} rows"


@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(("out_features", "in_features"), [(7, 100), (30, 300), (64, 64)])
def test_invariant_dense_rows_get_the_bits_they_get_alone(out_features, in_features, weight_dtype):
    torch.manual_seed(out_features)
    weight = torch.randn(out_features, in_features).to(weight_dtype)
    x = torch.randn(max(INVARIANT_ROWS), in_features)
    alone, together = _alone_and_together(
        lambda rows: native().linear_f32(rows, weight, None, True), x
    )
    torch.testing.assert_close(alone, F.linear(x, weight.float()), rtol=RTOL, atol=ATOL)
    for rows, y in together.items():
        assert torch.equal(y, alone[:rows]), f"{rows} rows"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_invariant_base_linear_takes_the_kernel_at_every_row_count(dtype):
    """`make_batch_invariant`: a BaseLinear's rows, fp32 or bf16 (in the bf16 kernel where
    the CPU has one, else widened for the fp32 kernel and rounded back), past the small-batch
    limit too, get the bits they get alone."""
    model = nn.Sequential(
        BaseLinear(_quantized(64, 128, "nf4", False, True)),
        BaseLinear(nn.Linear(64, 40).to(dtype)),
    )
    make_batch_invariant(model)
    x = torch.randn(SMALL_BATCH_ROWS + 44, 128).to(dtype)
    with torch.inference_mode():
        alone = torch.cat([model(x[i : i + 1]) for i in range(x.shape[0])])
        for rows in (*INVARIANT_ROWS, x.shape[0]):
            assert torch.equal(model(x[:rows]), alone[:rows]), f"{rows} rows"
    assert alone.dtype == dtype


@pytest.mark.skipif(not (amx_tiles() or bf16_pairs()), reason="the bf16 kernels' CPUs only")
@pytest.mark.parametrize("blocksize", [32, 64])
def test_invariant_bf16_rows_get_the_bits_they_get_alone(blocksize):
    """AMX tiles, or the pair kernel unfolded, at every row count: 4-bit weights with blocks
    the k-in-lanes path would take (64) and would not (32), and a bf16 weight."""
    layer = _quantized(96, 1024, "nf4", False, True, blocksize=blocksize)
    packed, bias = Packed4bit.of(layer), layer.bias.float()
    dense = torch.randn(40, 1024).bfloat16()
    x = torch.randn(SMALL_BATCH_ROWS, 1024).bfloat16()
    calls = {
        "4-bit": lambda rows: matmul_group(native(), rows, [packed], [bias], True)[0],
        "bf16": lambda rows: native().linear_bf16(rows, dense, None, True),
    }
    for name, call in calls.items():
        alone = torch.cat([call(x[i : i + 1]) for i in range(x.shape[0])])
        for rows in [*INVARIANT_ROWS[:-1], SMALL_BATCH_ROWS]:
            assert torch.equal(call(x[:rows]), alone[:rows]), f"{name}, {rows} rows"


def test_batch_invariance_is_refused_where_torch_would_run_a_projection():
    model = nn.Sequential(BaseLinear(nn.Linear(64, 40).half()))  # no kernel reads fp16 weights
    with pytest.raises(ValueError, match="batch_invariant needs loraserve's CPU kernels"):
        make_batch_invariant(model)


@pytest.mark.parametrize("row_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("slot_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_invariant_lora_delta_of_a_token_is_the_same_in_any_segment(row_dtype, slot_dtype):
    """A token's delta alone equals its delta inside segments of 1 to 40 tokens (chunks of 16,
    their 4-row blocks' remainders; with AMX, chunks that tiles would take)."""
    torch.manual_seed(3)
    lora_a = torch.randn(3, 16, 128).to(slot_dtype)
    lora_b = torch.randn(3, 16, 96).to(slot_dtype)
    scales = torch.tensor([1.0, 0.5, 2.0]) if slot_dtype == torch.bfloat16 else None
    x = torch.randn(40, 128).to(row_dtype)
    y = torch.randn(40, 96).to(row_dtype)

    def delta(rows: slice) -> torch.Tensor:
        out = y[rows].clone()
        segment = [torch.tensor([0]), torch.tensor([out.shape[0]]), torch.tensor([2]),
                   torch.tensor([16])]  # fmt: skip
        native().lora_delta_(x[rows].contiguous(), out, lora_a, lora_b, *segment, scales, None,
                             True)  # fmt: skip
        return out

    alone = torch.cat([delta(slice(t, t + 1)) for t in range(40)])
    for tokens in (2, 5, 8, 15, 16, 17, 33, 40):
        assert torch.equal(delta(slice(0, tokens)), alone[:tokens]), f"{tokens} tokens"
