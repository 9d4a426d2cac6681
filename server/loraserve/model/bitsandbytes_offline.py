"""bitsandbytes, imported without fetching code from the Hugging Face Hub.

On a CPU with AVX512-BF16, importing bitsandbytes (0.50) asks the `kernels` package for a compiled
4-bit GEMM from the Hub (`kernels-community/quantization-bitsandbytes`): a DNS lookup and a call
to the Hub at every start and, where the Hub answers, native code downloaded into the server and
run. The server never calls that GEMM (its projections run this package's kernels), must start
the same without a network, and runs no code it did not install. So the import runs with
`kernels.get_kernel` refusing every repository, and without bitsandbytes' warning about it.

Every module of the package imports bitsandbytes from here (`from
loraserve.model.bitsandbytes_offline import bnb`), and ruff's import order puts that line before
every third-party import (peft imports bitsandbytes), so whichever module comes first imports it
this way. Knows nothing else about bitsandbytes.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NoReturn

# bitsandbytes' logger for the CPU backend, which reports a kernel it could not fetch
_CPU_BACKEND_LOGGER = "bitsandbytes.backends.cpu.ops"


def _refuse(repo_id: str, *args: object, **kwargs: object) -> NoReturn:
    raise RuntimeError(f"loraserve loads no kernel from the Hugging Face Hub ({repo_id})")


@contextmanager
def _hub_kernels_refused() -> Iterator[None]:
    try:
        import kernels  # transformers' dependency; absent, bitsandbytes fetches nothing
    except ImportError:
        yield
        return
    fetch = kernels.get_kernel
    backend_logger = logging.getLogger(_CPU_BACKEND_LOGGER)
    was_disabled = backend_logger.disabled
    kernels.get_kernel = _refuse
    backend_logger.disabled = True
    try:
        yield
    finally:
        kernels.get_kernel = fetch
        backend_logger.disabled = was_disabled


with _hub_kernels_refused():
    import bitsandbytes as bnb

__all__ = ["bnb"]
