"""The rotary position embedding of q and k through the CPU kernel: one op instead of ten.

transformers' attention modules call `apply_rotary_pos_emb` as a global of their modeling
module, so that is where `fuse_rotary(model)` swaps it: in each modeling module of `model`'s
attention layers whose `apply_rotary_pos_emb` and `rotate_half` are the Llama family's, code for
code (Llama, Mistral, Qwen2/3 and the others transformers copies them to). The replacement runs
the compiled `rotary`, which rounds as the torch ops do (the same bits), only on CPU tensors of
one dtype (float32, bfloat16 or float16) and only inside `kernel_rotary_in_use()` (the runner's
forwards); any other caller in the process (a PEFT model, `generate`) runs transformers' own
function, as if nothing were swapped. Partial or interleaved rotary variants have other code
and are left alone.

Knows nothing about batches, caches or adapters.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from types import ModuleType

import torch
from torch import nn
from transformers.models.llama import modeling_llama

from loraserve.model.kernels import KERNEL_DTYPES, native
from loraserve.model.same_code import plain_function, same_code

Rotary = Callable[..., tuple[torch.Tensor, torch.Tensor]]

# Llama's own, kept before any swap (the swap replaces modeling_llama's too)
LLAMA_ROTARY: Rotary = (
    plain_function(modeling_llama.apply_rotary_pos_emb) or modeling_llama.apply_rotary_pos_emb
)
LLAMA_ROTATE_HALF = modeling_llama.rotate_half

_IN_USE: ContextVar[bool] = ContextVar("kernel_rotary_in_use", default=False)


@contextmanager
def kernel_rotary_in_use() -> Iterator[None]:
    """Within this block the swapped functions run the kernel where it applies."""
    token = _IN_USE.set(True)
    try:
        yield
    finally:
        _IN_USE.reset(token)


def computes_llama_rotary(module: ModuleType) -> bool:
    """Whether `module`'s `apply_rotary_pos_emb` and `rotate_half` are Llama's, code for code."""
    return same_code(getattr(module, "apply_rotary_pos_emb", None), LLAMA_ROTARY) and same_code(
        getattr(module, "rotate_half", None), LLAMA_ROTATE_HALF
    )


def kernel_rotary(original: Rotary) -> Rotary:
    """`original` (Llama's apply_rotary_pos_emb) by the compiled kernel where it applies."""

    @functools.wraps(original)
    def apply_rotary_pos_emb(
        q: torch.Tensor,
        k: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        unsqueeze_dim: int = 1,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """q [B, H, S, D], k [B, KVH, S, D], cos and sin [B or 1, S, D] -> (q, k) rotated."""
        ops = native()
        if (
            ops is None
            or not _IN_USE.get()
            or unsqueeze_dim != 1
            or q.dtype not in KERNEL_DTYPES
            or not all(t.dtype == q.dtype and t.device.type == "cpu" for t in (q, k, cos, sin))
            or (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad))
            or q.dim() != 4
            or k.dim() != 4
            or cos.dim() != 3
            or cos.shape != sin.shape
            or cos.shape[0] not in (1, q.shape[0])
            or cos.shape[1:] != q.shape[2:]
            or k.shape[0] != q.shape[0]
            or k.shape[2:] != q.shape[2:]
            or q.stride(3) != 1
            or k.stride(3) != 1
            or q.shape[3] % 2
        ):
            return original(q, k, cos, sin, unsqueeze_dim)
        return ops.rotary(q, k, cos.contiguous(), sin.contiguous())

    return apply_rotary_pos_emb


def fuse_rotary(model: nn.Module) -> int:
    """Swap the rotary embedding of `model`'s architectures for `kernel_rotary` where their
    modeling module has Llama's; returns how many modules were swapped (0 when already done)."""
    modules = {sys.modules.get(type(m).__module__) for m in model.modules()}
    swapped = [m for m in modules if m is not None and computes_llama_rotary(m)]
    for module in swapped:
        functions = vars(module)  # the module's globals, where its attention looks them up
        helper = functions["apply_rotary_pos_emb"]
        functions["apply_rotary_pos_emb"] = kernel_rotary(plain_function(helper) or helper)
    return len(swapped)
