"""fp32 weights whose every value is a bfloat16, held in bf16: half the memory and bytes read.

A checkpoint stored in bf16 (as published ones are) and loaded for fp32 compute holds bf16
values in fp32. `narrow_exact_weights` finds each such weight that can be held in bf16 without
changing any result, and holds it so: a `BaseLinear`'s dense weight (the output projection; with
an unquantized base, every projection), whose kernel widens it exactly as it reads it, together
with any plain `nn.Embedding` that shares it (tied embeddings), whose output is widened after
the lookup (also exact). A weight shared with anything else, or any embedding that computes on
its weight (Gemma's scaled one), stays as it is.

Knows nothing about adapters, batches or devices beyond the CPU kernels `BaseLinear` picks.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import nn

from loraserve.model.linear import BaseLinear

# Rows of a weight checked and copied at a time: never a whole second fp32 copy.
CHUNK_ROWS = 4096


def narrow_exact_weights(model: nn.Module) -> int:
    """Hold in bf16 every weight of `model` that allows it (see the module's docstring);
    returns the bytes this freed."""
    holders: dict[int, list[nn.Module]] = defaultdict(list)  # parameter -> modules holding it
    for module in model.modules():
        for parameter in module.parameters(recurse=False):
            holders[id(parameter)].append(module)
    freed = 0
    for module in list(model.modules()):
        if not isinstance(module, BaseLinear) or not module.dense or module.narrowed:
            continue
        weight = module.module.weight
        others = [m for m in holders[id(weight)] if m is not module.module]
        embeddings = [m for m in others if type(m) is nn.Embedding]
        if len(embeddings) != len(others):
            continue
        narrow = bf16_if_exact(weight.detach())
        if narrow is None:
            continue
        parameter = module.hold_narrow(narrow)
        for embedding in embeddings:
            hold_narrow_embedding(embedding, parameter)
        freed += weight.numel() * (weight.element_size() - narrow.element_size())
    return freed


def bf16_if_exact(weight: torch.Tensor) -> torch.Tensor | None:
    """`weight` (fp32) as bf16 if that is every value of it exactly, else None."""
    narrow = torch.empty_like(weight, dtype=torch.bfloat16)
    for start in range(0, weight.shape[0], CHUNK_ROWS):
        rows = slice(start, start + CHUNK_ROWS)
        narrow[rows] = weight[rows]
        if not torch.equal(narrow[rows].float(), weight[rows]):
            return None
    return narrow


def hold_narrow_embedding(embedding: nn.Embedding, weight: nn.Parameter) -> None:
    """`embedding` looks its rows up in `weight` (bf16, its fp32 weight's values) from now on
    and gives them widened to fp32: the rows its fp32 weight gave."""
    embedding.weight = weight
    embedding.register_forward_hook(widen_output)


def widen_output(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
    """A forward hook: the module's output in fp32."""
    return output.float()
