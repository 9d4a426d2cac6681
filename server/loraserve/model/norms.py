"""RMSNorm layers through the CPU kernel: one op per call instead of transformers' six.

`fuse_rms_norms(model)` swaps each RMSNorm whose forward is the Llama family's (Llama, Mistral,
Qwen2/3, Phi-3 and the others transformers copies it to: the same bytecode) for `FusedRMSNorm`,
which runs the compiled `rms_norm` on CPU inputs of float32, bfloat16 or float16 (weight of
the input's dtype) and the wrapped module otherwise.
Norms of another formula (Gemma's `1 + weight`, LayerNorm) are left alone.

Knows nothing about batches, caches or adapters.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from loraserve.model.kernels import KERNEL_DTYPES, native
from loraserve.model.same_code import same_code


def computes_llama_rms_norm(module: nn.Module) -> bool:
    """Whether `module`'s forward is transformers' Llama RMSNorm, code for code."""
    return (
        same_code(getattr(type(module), "forward", None), LlamaRMSNorm.forward)
        and isinstance(getattr(module, "weight", None), torch.Tensor)
        and isinstance(getattr(module, "variance_epsilon", None), float)
    )


class FusedRMSNorm(nn.Module):
    """The wrapped Llama-style RMSNorm, by the compiled kernel where it applies."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., D] -> [..., D]."""
        ops = native()
        weight = self.module.weight
        if (
            ops is None
            or x.device.type != "cpu"
            or x.dtype not in KERNEL_DTYPES
            or weight.dtype != x.dtype
        ):
            return self.module(x)
        rows = x.reshape(-1, x.shape[-1]).contiguous()
        return ops.rms_norm(rows, weight, self.module.variance_epsilon).view(x.shape)


def fuse_rms_norms(model: nn.Module) -> int:
    """Wrap every Llama-style RMSNorm of `model` in `FusedRMSNorm`; returns how many."""
    targets = [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if not isinstance(parent, FusedRMSNorm) and computes_llama_rms_norm(child)
    ]
    for parent, name, child in targets:
        setattr(parent, name, FusedRMSNorm(child))
    return len(targets)
