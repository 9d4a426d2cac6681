"""Whether a function is, code for code, one whose formula a compiled kernel reproduces.

transformers copies its Llama family's helpers (RMSNorm's forward, the rotary embedding) into
each architecture's modeling file; a copy compiles to the same bytecode, a variant (Gemma's
`1 + weight`, a partial rotary) does not. Knows nothing about what the functions compute.
"""

from __future__ import annotations

from typing import Any


def same_code(function: Any, reference: Any) -> bool:
    """Whether `function` has `reference`'s bytecode, constants and global names."""
    code, want = getattr(function, "__code__", None), reference.__code__
    return (
        code is not None
        and code.co_code == want.co_code
        and code.co_consts == want.co_consts
        and code.co_names == want.co_names
    )
