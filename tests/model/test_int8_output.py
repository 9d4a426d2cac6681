"""`Int8Linear`, the output projection in 8 bits: its quantization, its torch forward (the
kernel's oracle), and `BaseLinear` running it through `linear_int8`."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from loraserve.model.int8_output import CODE_MAX, Int8Linear
from loraserve.model.kernels import chosen_variant, native
from loraserve.model.linear import (
    AMX_DENSE_MAX_ROWS,
    AMX_TILE_MIN_ROWS,
    SMALL_BATCH_ROWS,
    BaseLinear,
    amx_tiles,
    make_batch_invariant,
)

needs_kernels = pytest.mark.skipif(native() is None, reason="no compiled kernels for this CPU")


def _linear(out_features: int, in_features: int, bias: bool, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    linear = nn.Linear(in_features, out_features, bias=bias)
    nn.init.normal_(linear.weight, std=0.05)
    return linear


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_each_weight_is_within_half_a_step_of_its_code_and_each_row_reaches_the_largest(dtype):
    linear = _linear(40, 96, bias=True).to(dtype)
    head = Int8Linear.quantize(linear)
    weight = linear.weight.float()
    assert head.weight.dtype == torch.int8 and head.scales.dtype == torch.float32
    assert head.weight.abs().max() <= CODE_MAX
    assert (head.weight.abs().amax(dim=1) == CODE_MAX).all()
    step = head.scales[:, None]  # half a step, and float32's rounding of code * scale
    assert ((head.dequantized() - weight).abs() <= step * (0.5 + 1e-4)).all()
    assert torch.equal(head.bias, linear.bias)  # kept as it is, in its dtype


def test_a_row_of_zeros_gets_scale_one_and_codes_zero():
    linear = _linear(8, 64, bias=False)
    with torch.no_grad():
        linear.weight[3] = 0
    head = Int8Linear.quantize(linear)
    assert head.scales[3] == 1 and not head.weight[3].any()
    assert torch.isfinite(head.scales).all() and head.bias is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_sums_the_codes_in_float32_then_scales_and_adds_the_bias(dtype):
    head = Int8Linear.quantize(_linear(24, 64, bias=True))
    x = torch.randn(2, 5, 64).to(dtype)
    want = (F.linear(x.float(), head.weight.float()) * head.scales + head.bias).to(dtype)
    got = head(x)
    assert got.dtype == dtype and torch.equal(got, want)
    close = F.linear(x.float(), head.dequantized(), head.bias).to(dtype)
    torch.testing.assert_close(
        got, close, rtol=1e-2 if dtype == torch.bfloat16 else 1e-5, atol=1e-5
    )


def _codes_dot_rows() -> int:
    """The most rows `linear_int8` multiplies by dot products in one block, where each row's
    sums are the ones it gets alone (gemm.h's kCodesDotRows for the loaded build's lanes)."""
    variant = chosen_variant()
    return 10 if variant is not None and variant.lanes == 16 else 6


@needs_kernels
@pytest.mark.parametrize(
    "rows", [1, 3, 4, 5, 6, 7, 8, 9, 10, 11, 16, 32, 33, 64, 70, SMALL_BATCH_ROWS]
)
@pytest.mark.parametrize(
    ("out_features", "in_features", "bias"),
    [(7, 100, True), (30, 300, False), (13, 37, True), (64, 64, False)],
)
def test_the_kernel_gives_the_bits_of_the_codes_as_an_fp32_weight_then_scaled(
    rows, out_features, in_features, bias
):
    """Codes widened as they are read: the same sums as an fp32 weight of their values, at
    every row count's path (up to `_codes_dot_rows`, the dot products' of each row alone); then
    each output times its scale, plus the bias."""
    head = Int8Linear.quantize(_linear(out_features, in_features, bias, seed=rows))
    x = torch.randn(rows, in_features)
    got = native().linear_int8(x, head.weight, head.scales, head.bias)
    weight = head.weight.float().contiguous()
    if rows <= _codes_dot_rows():
        summed = torch.cat([native().linear_f32(row, weight, None) for row in x.split(1)])
    else:
        summed = native().linear_f32(x, weight, None)
    want = summed * head.scales if head.bias is None else summed * head.scales + head.bias
    assert torch.equal(got, want)
    torch.testing.assert_close(got, head(x), rtol=1e-5, atol=1e-5)


@needs_kernels
def test_the_kernel_refuses_codes_that_are_not_int8():
    x, scales = torch.randn(2, 64), torch.ones(8)
    with pytest.raises(RuntimeError, match="codes must be a contiguous int8"):
        native().linear_int8(x, torch.zeros(8, 64, dtype=torch.uint8), scales, None)
    with pytest.raises(RuntimeError, match="must agree"):
        native().linear_int8(x, torch.zeros(8, 64, dtype=torch.int8), torch.ones(7), None)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_base_linear_runs_an_int8_head_in_the_kernel_and_past_it_on_the_dequantized_weight(dtype):
    head = Int8Linear.quantize(_linear(48, 64, bias=True))
    layer = BaseLinear(head)
    assert layer.int8 is head
    small = torch.randn(1, 5, 64).to(dtype)
    with torch.inference_mode():
        got = layer(small)
        want = native().linear_int8(small[0].float(), head.weight, head.scales, head.bias)
        assert got.dtype == dtype and torch.equal(got[0], want.to(dtype))
        large = torch.randn(SMALL_BATCH_ROWS + 3, 64).to(dtype)
        tolerance = 1e-2 if dtype == torch.bfloat16 else 1e-5
        torch.testing.assert_close(layer(large), head(large), rtol=tolerance, atol=tolerance)


@needs_kernels
def test_batch_invariant_int8_rows_get_the_bits_they_get_alone():
    head = Int8Linear.quantize(_linear(40, 96, bias=True))
    layer = BaseLinear(head)
    make_batch_invariant(layer)
    x = torch.randn(SMALL_BATCH_ROWS + 20, 96)
    with torch.inference_mode():
        alone = torch.cat([layer(x[i : i + 1]) for i in range(x.shape[0])])
        for rows in (2, 5, 8, 9, 17, 33, 64, 65, x.shape[0]):
            assert torch.equal(layer(x[:rows]), alone[:rows]), f"{rows} rows"


@pytest.mark.skipif(native() is None or not amx_tiles(), reason="no AMX tiles here")
@pytest.mark.parametrize("bias", [False, True])
def test_bf16_rows_from_the_tile_minimum_run_the_codes_in_tiles(bias):
    """Under bf16 compute, AMX_TILE_MIN_ROWS to AMX_DENSE_MAX_ROWS rows take the codes widened to
    bf16 (exactly) into tiles, summed in fp32 and scaled; fewer widen x for linear_int8."""
    head = Int8Linear.quantize(_linear(70, 128, bias, seed=3))
    layer = BaseLinear(head)
    bias_fp32 = None if head.bias is None else head.bias.float()
    for rows in (1, AMX_TILE_MIN_ROWS - 1, AMX_TILE_MIN_ROWS, 33, AMX_DENSE_MAX_ROWS):
        x = torch.randn(rows, 128).to(torch.bfloat16)
        with torch.inference_mode():
            got = layer(x)
        if rows < AMX_TILE_MIN_ROWS:
            want = native().linear_int8(x.float(), head.weight, head.scales, bias_fp32)
            assert torch.equal(got, want.to(torch.bfloat16)), rows
        else:
            want = native().linear_int8_bf16(x, head.weight, head.scales, bias_fp32)
            assert torch.equal(got, want), rows
        torch.testing.assert_close(got.float(), head(x).float(), rtol=1e-2, atol=1e-2)
