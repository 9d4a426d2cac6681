"""Long-lived host tensors on 2 MiB pages.

The KV pools, the LoRA slot buffers and the unquantized weights (the output projection, the
input embedding) live as long as the process and are read in every decode step, the pools and
slots a few KiB here and a few there: a row's context is its blocks, scattered over the pools
(in the default benchmark model each position's keys are a 4 KiB run of their own), and a
step's adapters are whichever slots its rows use. On 4 KiB pages nearly every such run is one
more address translation for the TLB to miss. Linux backs anonymous memory with transparent huge
pages where a process asks for them (`madvise(MADV_HUGEPAGE)`: the `madvise` mode, most
distributions' default) or everywhere (`always`); torch's allocator does not ask.

`zeros` maps such memory for one tensor, aligned to 2 MiB, asks for huge pages for its whole
2 MiB runs (a last partial run stays on 4 KiB pages: no memory is wasted) and zeroes it, so its
pages are faulted in now, not in a step; `adopt_parameters` moves a module's floating-point
parameters there. Each tensor has a mapping of its own, unmapped when the tensor is freed.
Where huge pages cannot be had (not Linux, THP set to `never`, `LORASERVE_HUGE_PAGES=off`, a
device tensor, fewer than 2 MiB, a mapping the kernel refuses) tensors stay torch's: the values
are the same either way, only where they live differs. 4-bit weights' packed bytes stay where
they are loaded: moved as well, they measured no faster (docs/performance.md).

Knows nothing about particular models: only shapes, dtypes, devices and a module's parameters.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import math
import mmap
import os
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)

HUGE_PAGE = 2 << 20
SWITCH = "LORASERVE_HUGE_PAGES"
THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def available() -> bool:
    """Whether this kernel gives huge pages to memory that asks for them, and the environment
    does not turn them off (`LORASERVE_HUGE_PAGES=off`)."""
    return os.environ.get(SWITCH, "").lower() not in ("off", "0", "false") and _kernel_gives()


@functools.cache
def _kernel_gives() -> bool:
    """Whether this kernel backs memory that asks (read once: the mode is the host's)."""
    if not hasattr(mmap, "MADV_HUGEPAGE"):
        return False
    try:
        return "[never]" not in THP_MODE.read_text()
    except OSError:
        return False


def eligible(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str) -> bool:
    """Whether a tensor of this shape, dtype and device goes on huge pages."""
    return torch.device(device).type == "cpu" and _nbytes(shape, dtype) >= HUGE_PAGE and available()


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    return math.prod(shape) * dtype.itemsize


def zeros(
    shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """`torch.zeros(shape, dtype=dtype, device=device)`, on huge pages where it is eligible."""
    if not eligible(shape, dtype, device):
        return torch.zeros(shape, dtype=dtype, device=device)
    count, nbytes = math.prod(shape), _nbytes(shape, dtype)
    try:
        mapping = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        offset = -ctypes.addressof(ctypes.c_char.from_buffer(mapping)) % HUGE_PAGE
        # whole huge pages only: the tensor's last partial one stays on 4 KiB pages, not 2 MiB
        mapping.madvise(mmap.MADV_HUGEPAGE, offset, nbytes // HUGE_PAGE * HUGE_PAGE)
    except OSError as error:  # out of mappings (vm.max_map_count), or a kernel that refuses
        log.warning("huge pages refused (%s): %s on 4 KiB pages", error, tuple(shape))
        return torch.zeros(shape, dtype=dtype, device=device)
    # the tensor holds a reference to the mapping; the mapping is unmapped once both are gone
    tensor = torch.frombuffer(mapping, dtype=dtype, count=count, offset=offset)
    return tensor.view(shape).zero_()


def adopt_parameters(module: nn.Module) -> int:
    """Move each eligible floating-point parameter of `module` onto huge pages in place (the
    `Parameter` objects stay, so tied weights stay tied), one at a time: each is held twice
    while it is copied. Returns the bytes moved."""
    moved = 0
    for parameter in module.parameters():
        if parameter.is_floating_point() and eligible(
            tuple(parameter.shape), parameter.dtype, parameter.device
        ):
            parameter.data = zeros(tuple(parameter.shape), parameter.dtype).copy_(parameter)
            moved += parameter.nbytes
    return moved
