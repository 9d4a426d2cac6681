"""Whether a function is, code for code, one whose formula a compiled kernel reproduces.

transformers copies its Llama family's helpers (RMSNorm's forward, the rotary embedding) into
each architecture's modeling file; a copy compiles to the same bytecode, a variant (Gemma's
`1 + weight`, a partial rotary) does not. From transformers 5.25, with the `kernels` package it
requires, a helper may be a module instance that calls the function (`kernels`'
`use_kernel_forward_from_hub` on a function, for kernels from the Hugging Face Hub): the function
it calls is the one compared. Knows nothing about what the functions compute.
"""

from __future__ import annotations

import types
from typing import Any


def plain_function(helper: Any) -> types.FunctionType | None:
    """`helper` when it is a function; the function it calls when it is a module instance made
    from one by `kernels`' `use_kernel_forward_from_hub` (its class's forward closes over it as
    `func`); else None."""
    if isinstance(helper, types.FunctionType):
        return helper
    forward = getattr(type(helper), "forward", None)
    if not isinstance(forward, types.FunctionType) or forward.__closure__ is None:
        return None
    names = forward.__code__.co_freevars
    function = forward.__closure__[names.index("func")].cell_contents if "func" in names else None
    return function if isinstance(function, types.FunctionType) else None


def same_code(helper: Any, reference: Any) -> bool:
    """Whether `helper`'s function has `reference`'s bytecode, constants and global names."""
    function, want = plain_function(helper), plain_function(reference)
    if function is None or want is None:
        return False
    code, wanted = function.__code__, want.__code__
    return (
        code.co_code == wanted.co_code
        and code.co_consts == wanted.co_consts
        and code.co_names == wanted.co_names
    )
