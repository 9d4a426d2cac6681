"""The output projection in 8 bits: `quantize_output = "int8"`.

At a few rows a decode step's largest read is the output projection (vocabulary x hidden), which
bitsandbytes and PEFT keep in the compute dtype. `Int8Linear` holds it as int8 codes with one
float32 scale an output row (symmetric: scale = the row's largest magnitude / 127, codes the
weight / scale rounded to nearest even): a quarter of fp32's bytes, half of bf16's, and each
weight within half a scale step of its value, where NF4's 4-bit blocks (`quantize_output =
"4bit"`) move it by up to half of its block's widest code gap. Logits are y = (x @ codes^T) *
scales + bias: on CPUs the compiled `linear_int8` widens the codes as it reads them (the same
paths as a dense fp32 weight, batch-invariant ones too); elsewhere `forward` is that formula in
torch, which is also the kernel's test oracle.

Knows nothing about the model around it: `loading` puts it in place of the output projection,
`linear.BaseLinear` picks the kernel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

CODE_MAX = 127  # codes in [-127, 127]: symmetric, so -128 is never used


class Int8Linear(nn.Module):
    """y = (x @ codes^T) * scales + bias. codes: [out, in] int8; scales: [out] float32; bias:
    [out] in the compute dtype, or None."""

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.in_features = codes.shape[1]
        self.out_features = codes.shape[0]
        self.weight = nn.Parameter(codes, requires_grad=False)  # what BaseLinear calls a weight
        self.scales = nn.Parameter(scales, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    @classmethod
    def quantize(cls, linear: nn.Linear) -> Int8Linear:
        """`linear`'s weight [out, in] (any float dtype) as codes and scales, computed in
        float32; its bias kept as it is. A row of zeros gets scale 1 and codes 0."""
        weight = linear.weight.detach().float()
        largest = weight.abs().amax(dim=1)  # [out]
        scales = torch.where(largest > 0, largest / CODE_MAX, torch.ones_like(largest))
        codes = torch.round(weight / scales[:, None]).clamp_(-CODE_MAX, CODE_MAX)
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls(codes.to(torch.int8), scales, bias)

    def dequantized(self) -> torch.Tensor:
        """The weight the codes stand for: [out, in] float32."""
        return self.weight.float() * self.scales[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., in] -> [..., out] in x's dtype, summed in float32."""
        y = F.linear(x.float(), self.weight.float()) * self.scales
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x.dtype)
