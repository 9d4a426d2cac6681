"""The base projection's matmul, by the fastest path for its device, weight format and rows.

`BaseLinear` wraps a loaded projection (an `nn.Linear` or a bitsandbytes `Linear4bit`) without
copying its weights, and picks per call:

- 4-bit (NF4 / FP4) on the CPU, at most `SMALL_BATCH_ROWS` rows (decode): the fused kernel,
  which decodes a few output columns at a time into cache inside the GEMM, never the whole
  weight;
- 4-bit on the CPU, more rows (prefill): bitsandbytes' own dequantize once, then one fp32
  GEMM (bf16 measured slower on a CPU with AVX512-BF16, and less exact: a prompt's tokens would
  depend on how its prefill was split into steps, as with a cached prefix);
- fp32 weights on the CPU, at most `SMALL_BATCH_ROWS` rows: the small-batch kernel;
- anything else (CUDA, int8, bf16 / fp16 weights, no compiled kernels): the module itself.

Every path gives the values bitsandbytes' dequantize-then-matmul gives, up to the summation
order. Knows nothing about LoRA, adapters or batches: it sees rows of activations.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import bitsandbytes as bnb
import torch
import torch.nn.functional as F
from torch import nn

from loraserve.model.kernels import native

# Up to this many rows the fused small-batch kernels beat dequantize + GEMM (see
# docs/performance.md); above it the one big GEMM amortises the dequantization.
SMALL_BATCH_ROWS = 256


@dataclass(frozen=True)
class NestedScales:
    """bitsandbytes' double quantization of the block scales: absmax[b] = code2[absmax8[b]] *
    absmax2[b // 256] + offset. absmax2: [blocks / 256] float32; code2: [256] float32."""

    absmax2: torch.Tensor
    code2: torch.Tensor
    offset: float


@dataclass(frozen=True)
class Packed4bit:
    """A bitsandbytes 4-bit weight as the kernels read it (the same bytes, not a copy).

    packed: [N * K / 2] uint8, two codes per byte, high nibble first; absmax: [N * K /
    blocksize] float32, or uint8 when `nested` (double quantization) says how to decode it;
    code: [16].
    """

    packed: torch.Tensor
    absmax: torch.Tensor
    code: torch.Tensor
    blocksize: int
    out_features: int
    in_features: int
    nested: NestedScales | None

    @classmethod
    def of(cls, layer: bnb.nn.Linear4bit) -> Packed4bit | None:
        """The layer's weight, or None when the kernels cannot read it as it is stored."""
        params: Any = layer.weight  # a bitsandbytes Params4bit
        state = params.quant_state
        if getattr(state, "packing_format_for_cpu", False) or len(state.shape) != 2:
            return None
        out_features, in_features = state.shape
        blocksize = state.blocksize
        if in_features % blocksize or blocksize < 32 or blocksize & (blocksize - 1):
            return None
        nested = None
        if state.nested:
            if state.state2.blocksize != 256:
                return None
            nested = NestedScales(
                state.state2.absmax.float().contiguous(),
                state.state2.code.float().contiguous(),
                float(state.offset),
            )
        return cls(
            layer.weight.data.view(torch.uint8).reshape(-1),
            state.absmax.contiguous() if nested else state.absmax.float().contiguous(),
            state.code.float().contiguous(),
            state.blocksize,
            out_features,
            in_features,
            nested,
        )

    def scales(self) -> torch.Tensor:
        """[N * K / blocksize] float32: the block scales, decoded when double-quantized."""
        if self.nested is None:
            return self.absmax
        codes = self.nested.code2[self.absmax.long()]
        per_block = self.nested.absmax2.repeat_interleave(256)[: self.absmax.numel()]
        return codes * per_block + self.nested.offset

    def dequantize(self) -> torch.Tensor:
        """[N, K] float32: bitsandbytes' own dequantization."""
        return torch.ops.bitsandbytes.dequantize_4bit(
            self.packed,
            self.scales(),
            self.blocksize,
            "fp4" if self.code[1] > 0 else "nf4",
            (self.out_features, self.in_features),
            torch.float32,
        )

    def matmul(self, ops: Any, rows: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """rows [M, K] fp32 -> [M, N] through the fused kernel."""
        n = self.nested
        return ops.linear_4bit(
            rows, self.packed, self.absmax, self.code, self.blocksize, self.out_features, bias,
            None if n is None else n.absmax2, None if n is None else n.code2,
            0.0 if n is None else n.offset,
        )  # fmt: skip


class BaseLinear(nn.Module):
    """y = base(x) by the fastest path this call's rows allow; the wrapped module is kept."""

    def __init__(self, module: nn.Linear) -> None:
        super().__init__()
        self.module = module
        self.in_features = module.in_features
        self.out_features = module.out_features
        weight = module.weight
        if isinstance(module, bnb.nn.Linear4bit):
            # On CPUs with AVX512-BF16, bitsandbytes repacks a Linear4bit's weight in place at
            # its first CPU forward in eval mode (bf16 compute), into a layout that neither the
            # kernels nor DoRA's weight norms read, keeping the old bytes alive beside the new.
            module.support_avx512bf16_for_cpu = False
        on_cpu = weight.device.type == "cpu" and native() is not None
        self.packed = (
            Packed4bit.of(module) if on_cpu and isinstance(module, bnb.nn.Linear4bit) else None
        )
        self.dense = on_cpu and type(module) is nn.Linear and weight.dtype == torch.float32

    def project(self, rows: torch.Tensor) -> torch.Tensor | None:
        """rows [M, in] float32 -> rows W^T [M, out], without the bias, by the CPU's
        small-batch kernels; None where they do not take this projection or this many rows."""
        ops = native()
        if ops is None or rows.dtype != torch.float32 or rows.shape[0] > SMALL_BATCH_ROWS:
            return None
        return self._small_batch(ops, rows.contiguous(), None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., in] -> [..., out]."""
        ops = native()
        if ops is None or x.dtype != torch.float32:
            return self.module(x)
        rows = x.reshape(-1, self.in_features).contiguous()
        bias = None if self.module.bias is None else self.module.bias.float()
        small = rows.shape[0] <= SMALL_BATCH_ROWS
        y = self._small_batch(ops, rows, bias) if small else None
        if y is None and self.packed is not None:
            y = F.linear(rows, self.packed.dequantize(), bias)
        elif y is None:
            return self.module(x)
        return y.view(*x.shape[:-1], self.out_features)

    def _small_batch(
        self, ops: Any, rows: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor | None:
        """rows [M, in] float32, contiguous, M at most SMALL_BATCH_ROWS -> [M, out] by the
        small-batch kernels; None where they do not take this projection."""
        if self.packed is not None:
            return self.packed.matmul(ops, rows, bias)
        if self.dense:
            return ops.linear_f32(rows, self.module.weight, bias)
        return None
