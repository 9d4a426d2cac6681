"""Long-lived host tensors on 2 MiB pages.

The engine's largest host tensors live as long as the process and are read through in every
decode step: the KV pools, the LoRA slot buffers, and the unquantized weights (the output
projection, the input embedding). On 4 KiB pages each of those reads crosses a page every 4 KiB
(a position's keys in the default benchmark model are one 4 KiB run, and so is a row of its
output projection), and every page is one more translation for the TLB to miss. Linux backs
anonymous memory with transparent huge pages where a process asks for them
(`madvise(MADV_HUGEPAGE)`: the `madvise` mode, most distributions' default) or everywhere
(`always`); torch's allocator does not ask.

`zeros` maps such memory for one tensor, aligned to 2 MiB, asks for huge pages for its whole
2 MiB runs (a last partial run stays on 4 KiB pages: no memory is wasted) and zeroes it, so its
pages are faulted in now, not in a step; `adopt` moves a tensor's values there. Each tensor has
a mapping of its own, unmapped when the tensor is freed. Where huge pages cannot be had (not
Linux, THP set to `never`, `LORASERVE_HUGE_PAGES=off`, a device tensor, fewer than 2 MiB) both
fall back to plain tensors: the values are the same either way, only where they live differs.

Knows nothing about particular models: only shapes, dtypes, devices and a module's parameters.
"""

from __future__ import annotations

import ctypes
import math
import mmap
import os
from pathlib import Path

import torch
from torch import nn

HUGE_PAGE = 2 << 20
SWITCH = "LORASERVE_HUGE_PAGES"
THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def available() -> bool:
    """Whether this kernel gives huge pages to memory that asks for them, and the environment
    does not turn them off (`LORASERVE_HUGE_PAGES=off`)."""
    if os.environ.get(SWITCH, "").lower() in ("off", "0", "false") or not hasattr(
        mmap, "MADV_HUGEPAGE"
    ):
        return False
    try:
        mode = THP_MODE.read_text()
    except OSError:
        return False
    return "[never]" not in mode


def eligible(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str) -> bool:
    """Whether a tensor of this shape, dtype and device goes on huge pages."""
    return torch.device(device).type == "cpu" and _nbytes(shape, dtype) >= HUGE_PAGE and available()


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()


def zeros(
    shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """`torch.zeros(shape, dtype=dtype, device=device)`, on huge pages where it is eligible."""
    if not eligible(shape, dtype, device):
        return torch.zeros(shape, dtype=dtype, device=device)
    count, nbytes = math.prod(shape), _nbytes(shape, dtype)
    mapping = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    offset = -ctypes.addressof(ctypes.c_char.from_buffer(mapping)) % HUGE_PAGE
    # whole huge pages only: the tensor's last partial one stays on 4 KiB pages, not 2 MiB
    mapping.madvise(mmap.MADV_HUGEPAGE, offset, nbytes // HUGE_PAGE * HUGE_PAGE)
    # the tensor holds a reference to the mapping; the mapping is unmapped once both are gone
    tensor = torch.frombuffer(mapping, dtype=dtype, count=count, offset=offset)
    return tensor.view(shape).zero_()


def adopt(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor`'s values on huge pages where it is eligible (a contiguous copy), else
    `tensor` itself."""
    if not eligible(tuple(tensor.shape), tensor.dtype, tensor.device):
        return tensor
    moved = zeros(tuple(tensor.shape), tensor.dtype)
    return moved.copy_(tensor)


def adopt_parameters(module: nn.Module) -> int:
    """Move each eligible floating-point parameter of `module` onto huge pages in place (the
    `Parameter` objects stay, so tied weights stay tied); returns the bytes moved. Quantized
    weights (packed integers, which their layers' kernels hold references to) stay where they
    are."""
    moved = 0
    for parameter in module.parameters():
        if parameter.is_floating_point() and eligible(
            tuple(parameter.shape), parameter.dtype, parameter.device
        ):
            parameter.data = adopt(parameter.data)
            moved += parameter.nbytes
    return moved
