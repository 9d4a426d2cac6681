"""fp32 weights whose every value is a bfloat16, held in bf16: half the memory and bytes read.

A checkpoint stored in bf16 (as published ones are) and loaded for fp32 compute holds bf16
values in fp32. `narrow_exact_weights` finds each such weight that can be held in bf16 without
changing any result, and holds it so: a `BaseLinear`'s dense weight (the output projection; with
an unquantized base, every projection), whose kernel widens it exactly as it reads it, and a
plain `nn.Embedding`'s (the input embedding, tied to the output projection or not), whose
lookups are widened after the fact (also exact). A weight held by anything else as well, or an
embedding that computes on its weight (Gemma's scaled one, or one with `max_norm`), stays fp32.

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
    """Hold in bf16 every fp32 weight of `model` that allows it (see the module's docstring);
    returns the bytes this freed."""
    dense = {
        id(m.module): m for m in model.modules() if isinstance(m, BaseLinear) and m.dense
    }  # the nn.Linear each dense BaseLinear runs, by id
    holders: dict[int, list[tuple[nn.Module, str]]] = defaultdict(list)  # by parameter id
    for module in model.modules():
        for name, parameter in module.named_parameters(recurse=False):
            holders[id(parameter)].append((module, name))
    freed = 0
    for held in holders.values():
        weight = getattr(*held[0])
        if weight.dtype != torch.float32 or not all(
            name == "weight" and (id(module) in dense or is_plain_lookup(module))
            for module, name in held
        ):
            continue
        narrow = bf16_if_exact(weight.detach())
        if narrow is None:
            continue
        parameter = nn.Parameter(narrow, requires_grad=False)
        for module, _ in held:
            if id(module) in dense:
                dense[id(module)].hold_narrow(parameter)
            else:
                hold_narrow_embedding(module, parameter)
        freed += weight.numel() * (weight.element_size() - narrow.element_size())
    return freed


def is_plain_lookup(module: nn.Module) -> bool:
    """Whether `module` is an embedding whose forward only looks rows of its weight up."""
    return type(module) is nn.Embedding and module.max_norm is None


def bf16_if_exact(weight: torch.Tensor) -> torch.Tensor | None:
    """`weight` (fp32) as bf16 if that is every value of it exactly, else None."""
    narrow = torch.empty_like(weight, dtype=torch.bfloat16)
    for start in range(0, weight.shape[0], CHUNK_ROWS):
        rows = slice(start, start + CHUNK_ROWS)
        narrow[rows] = weight[rows]
        if not torch.equal(narrow[rows].float(), weight[rows]):
            return None
    return narrow


def hold_narrow_embedding(embedding: nn.Module, weight: nn.Parameter) -> None:
    """`embedding` looks its rows up in `weight` (bf16, its fp32 weight's values) from now on
    and gives them widened to fp32: the rows its fp32 weight gave."""
    embedding.weight = weight
    embedding.register_forward_hook(widen_output)


def widen_output(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
    """A forward hook: the module's output in fp32."""
    return output.float()
