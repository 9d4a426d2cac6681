"""The base projection's matmul, by the fastest path for its device, weight format and rows.

`BaseLinear` wraps a loaded projection (an `nn.Linear` or a bitsandbytes `Linear4bit`) without
copying its weights, and picks per call:

- 4-bit (NF4 / FP4) on the CPU, at most `SMALL_BATCH_ROWS` rows (decode): the fused kernel,
  which decodes a few output columns at a time into cache inside the GEMM, never the whole
  weight;
- 4-bit on the CPU, more rows (prefill): bitsandbytes' own dequantize once, then one fp32
  GEMM (bf16 measured slower on a CPU with AVX512-BF16, and less exact: a prompt's tokens would
  depend on how its prefill was split into steps, as with a cached prefix);
- 4-bit under bf16 compute, from `AMX_TILE_MIN_ROWS` to `SMALL_BATCH_ROWS` rows, on a CPU
  whose AMX tiles the kernels may use: the bf16 kernel, which decodes the weight to bf16 (as
  bitsandbytes' dequantize to bf16 rounds it) a chunk at a time inside the GEMM, multiplies in
  the tiles and sums in fp32; on an AMD CPU with AVX512-BF16 (Zen 4 and 5), the same kernel
  from `PAIRS_MIN_ROWS` rows (from one row where its blocks allow), multiplying by AVX512-BF16's
  pair dot products (`bf16_pairs_take_4bit`); fewer bf16 rows, bf16 rows on an Intel CPU
  without tiles, and fp16 rows are widened to fp32 for the fused kernel; a bf16 weight (the
  output projection under bf16 compute) is read in place by the bf16 kernel, up to
  `AMX_DENSE_MAX_ROWS` rows with tiles, up to `SMALL_BATCH_ROWS` without;
- fp32 weights on the CPU, at most `SMALL_BATCH_ROWS` rows: the small-batch kernel. Where
  every value of such a weight is a bfloat16 (a checkpoint stored in bf16, loaded for fp32
  compute), it may be held in bf16 (`hold_narrow`, `model/narrow.py`): half the memory and
  half the bytes a call reads, and the kernel widens it exactly, so the sums are those of the
  fp32 weight;
- an output projection held in 8 bits (`int8_output.Int8Linear`) on the CPU: the same
  small-batch kernel, reading its codes widened (rows of any dtype widened to fp32 first), then
  scaling each output; under bf16 compute with AMX, from `AMX_TILE_MIN_ROWS` to
  `AMX_DENSE_MAX_ROWS` rows, the codes widened to bf16 (exactly) into tiles; past the kernels'
  rows one fp32 GEMM on its dequantized weight;
- anything else (CUDA, int8 bases, 16-bit weights the bf16 kernels do not take, no compiled
  kernels): the module itself.

Every path gives the values bitsandbytes' dequantize-then-matmul gives, up to the summation
order, which differs between paths: a row's outputs may round apart with the rows beside it.
`make_batch_invariant` holds a model's projections to the kernels' paths that sum each output
in one order at every row count (fp32: the fused kernels without their GEMVs, past
SMALL_BATCH_ROWS too; bf16 with AMX: the tiles at every row count; bf16 with AVX512-BF16 but
no AMX: the pair dot products unfolded), so that a row's bits are its own.

Projections a module calls one after another on the same activations (attention's q, k and v;
an MLP's gate and up) can be linked as one `SharedInputGroup`: on the 4-bit small-batch
path the first of them called with a tensor computes them all in one kernel call (one transpose
of the rows, one parallel region, one call from Python), and the others take their outputs.
Knows nothing about LoRA, adapters or batches: it sees rows of activations.
"""

from __future__ import annotations

import bisect
import functools
import itertools
from dataclasses import dataclass
from typing import Any

from loraserve.model.bitsandbytes_offline import bnb

import torch
import torch.nn.functional as F
from torch import nn

from loraserve.model.int8_output import Int8Linear
from loraserve.model.kernels import native

# Up to this many rows the fused small-batch kernels beat dequantize + GEMM (see
# docs/performance.md); above it the one big GEMM amortises the dequantization.
SMALL_BATCH_ROWS = 256
# Under a 16-bit compute dtype, up to this many rows (SMALL_BATCH_ROWS without tiles) widen to
# fp32 for the 4-bit kernel rather than dequantize the whole weight for a 16-bit GEMM: with AMX
# a bf16 decode step of 8 rows took 19 ms against 36, of 32 rows 39 against 45, of 64 rows 70
# against 59 (docs/performance.md).
AMX_WIDENED_MAX_ROWS = 32
# Under bf16 compute, where the kernels may use this CPU's AMX tiles, from this many rows up to
# SMALL_BATCH_ROWS the 4-bit weight is decoded to bf16 into tiles inside the GEMM: a decode
# step's 56 projections (benchmarks/bench_bf16_kernels.py, 2 threads) took 9.5 ms against the
# widened kernel's 22.7 at 32 rows, and 31.1 against dequantize + bf16 GEMM's 60.8 at 256
# (2026-12-01); on the Xeon with AMX on 2026-12-05 (three runs) 8.7-9.8 against 10.3-13.4 at 5
# to 8 rows, and at 4 rows 7.4-9.0 widened against 9.5-9.9 in tiles (engine decode steps of 5, 6
# and 7 requests 0.94x, 0.88x and 0.83x the time with 8 here, 4 unchanged).
AMX_TILE_MIN_ROWS = 5
# A bf16 weight (the output projection, an unquantized projection under bf16 compute) is read
# into tiles as it is stored, up to this many rows: the output projection of 32,000 x 1,024
# took 2.2 ms against torch's bf16 GEMM's 2.8 at one row, 2.3 against 3.5 at 32, 5.1 against
# 6.7 at 128, 8.8 against 9.1 at 256 (the same benchmark).
AMX_DENSE_MAX_ROWS = 128
# An 8-bit output projection's codes (`int8_output`) under bf16 compute, widened to bf16 into
# tiles from AMX_TILE_MIN_ROWS rows up to AMX_DENSE_MAX_ROWS; fewer widen to fp32 for
# `linear_int8`. The 32,000 x 1,024 projection on the Xeon with AMX (a one-off script, medians
# of 19, 2026-12-06): tiles 1.9-2.1 ms from 1 to 16 rows, 2.3 at 32, 3.2 at 64 (the bf16 weight
# 2.3-2.9, 3.7); widened to fp32 1.1 at 1 row, 1.6 at 4, 4.5 at 6, 6.0 at 32. Since 5 to 10
# rows of codes take the dot products (gemm.h, kCodesDotRows): widened 1.64 ms at 4 rows, 1.99
# at 5, 2.22 at 6, 2.59 at 8 against the tiles' 1.85, 1.70, 1.64, 1.65, so the tiles still
# start at 5. Without tiles the codes always widen: on the Xeon with its tiles turned off
# (LORASERVE_AMX=off) the pair dot products took 1.3-2.7x the widened path's time at every row
# count (benchmarks/RESULTS.md, 2026-12-06).
# Without AMX tiles, on a CPU with AVX512-BF16, the same bf16 kernel multiplies by pair dot
# products from this many rows up to SMALL_BATCH_ROWS: a decode step's 56 projections (the same
# benchmark, a 2-core AMD EPYC, 20 rounds) took 8.5 ms against the widened kernel's 9.8 at 4
# rows (7.2 against 7.6 at 3, 8.1 against 5.9 at 2), 8.5 against 14.2 at 6, 21.4 against 37.3
# at 32, 159.8 against dequantize + bf16 GEMM's 189.5 at 256. Up to 8 rows are folded into the
# lanes (amx.h, pairs_fold); 9 to 16 rows cost what 16 do. A bf16 weight is read in place from
# one row: the output projection took 3.3 ms against torch's bf16 GEMM's 3.6 at one row, 3.7
# against 5.6 at 4, 6.8 against 8.9 at 32, 42.0 against 45.4 at 256.
PAIRS_MIN_ROWS = 4
# ... except that a 4-bit weight whose quantization blocks hold at least this many k takes it
# from one row: up to 6 rows go to the kernel's k-in-lanes path (amx.h, gemv_bf16), which
# decodes each column's weights into registers. The default model's 56 projections (a one-off
# script alternating the paths, 2 threads, 2026-12-04) took 2.20 ms against the widened
# kernel's 3.15 at one row, 3.35 against 6.93 at 3, 3.82 against the folded pair kernel's 5.81
# at 4, 5.52 against 7.22 at 6; a Llama 3 8B layer's seven 4.27 against 5.65 at one row (29 GB/s
# of weights and scales: about what this machine's cores read).
GEMV_BF16_MIN_BLOCK = 64
# Where the paths above change with the row count (each the first row count of a new choice):
# between two of them every row count takes the same paths through `BaseLinear`, the kernels
# choosing among their own inside the call (`rows_alike`).
PATH_CHANGES_AT = tuple(
    sorted({PAIRS_MIN_ROWS, AMX_TILE_MIN_ROWS, AMX_WIDENED_MAX_ROWS + 1, AMX_DENSE_MAX_ROWS + 1})
)
_RANGE_STARTS = (1, *PATH_CHANGES_AT, SMALL_BATCH_ROWS + 1)  # rows_alike's ranges' first rows
BF16_STEP_K = 32  # the bf16 kernels take k 32 at a time: in_features must be a multiple
NARROW_DTYPES = (torch.bfloat16, torch.float16)
CONTIGUOUS = torch.contiguous_format


def rows_alike(rows: int) -> range:
    """The row counts that take the same paths through `BaseLinear` as `rows` rows do, on any
    CPU, compute dtype and weight (1-3, 4, 5-32, 33-128, 129-256): what a decode record of the
    model's forward (`decode_traces`), which holds the choices its recording made, may replay.
    Past SMALL_BATCH_ROWS, `rows` alone (rows in bf16 tiles are split into parts by their
    count)."""
    if rows > SMALL_BATCH_ROWS:
        return range(rows, rows + 1)
    at = bisect.bisect_right(_RANGE_STARTS, rows)
    return range(_RANGE_STARTS[at - 1], _RANGE_STARTS[at])


def ranges_alike(most_rows: int) -> list[range]:
    """Every range `rows_alike` answers for 1 to `most_rows` rows, in order (none of those past
    SMALL_BATCH_ROWS, where each count is a range of its own)."""
    most = min(most_rows, SMALL_BATCH_ROWS)
    return [range(a, b) for a, b in itertools.pairwise(_RANGE_STARTS) if a <= most]


@functools.cache
def amx_tiles() -> bool:
    """Whether the kernels multiply bf16 rows in this CPU's AMX tiles (the CPU has them, the
    OS lets this process use them, and the loaded build has the code)."""
    ops = native()
    return ops is not None and bool(ops.amx_usable())


def probe_bf16_paths() -> None:
    """Ask the kernels now which bf16 paths this CPU takes (`amx_tiles`, `bf16_pairs`,
    `bf16_pairs_take_4bit`: each answer is kept): a forward recorded for a decode record
    (`decode_traces`) before any other ran would ask inside the recording, which cannot hold an
    op that answers a bool, and drop that record."""
    amx_tiles()
    bf16_pairs()
    bf16_pairs_take_4bit()


@functools.cache
def bf16_pairs() -> bool:
    """Whether the kernels multiply bf16 rows by AVX512-BF16's pair dot products: this CPU has
    them (and AVX512-VBMI, which the kernels' decoding takes) and no AMX tiles the kernels may
    use (which take precedence)."""
    ops = native()
    return ops is not None and bool(ops.bf16_pairs_usable()) and not amx_tiles()


@functools.cache
def cpu_vendor() -> str:
    """This CPU's maker as Linux names it (/proc/cpuinfo's vendor_id: GenuineIntel,
    AuthenticAMD); empty where it is not known."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("vendor_id"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return ""


def pairs_beat_widening(vendor: str) -> bool:
    """Whether, on a CPU of `vendor` (`cpu_vendor`), AVX512-BF16's pair dot products beat 4-bit
    weights widened to fp32: on AMD's only (`bf16_pairs_take_4bit`)."""
    return vendor == "AuthenticAMD"


@functools.cache
def bf16_pairs_take_4bit() -> bool:
    """Whether bf16 rows of a 4-bit weight take the pair dot products (where `bf16_pairs()`):
    on AMD CPUs only (`pairs_beat_widening`). On the 2-core AMD EPYC a decode step's 56
    projections took 21.7 ms at 32 rows against the widened fp32 kernel's 37.2; on the Intel
    Xeon with its tiles turned off (`LORASERVE_AMX=off`, standing in for one whose AMX is
    withheld; bench_bf16_kernels.py, 2026-12-06) the widened kernel was as fast or faster at
    every row count: 4.05 against 4.29 ms at one row, 9.34 against 9.34 at 6, 10.34 against
    12.41 at 8, 25.36 against 34.57 at 32. bf16 weights (the output projection) take the pair
    kernel on both: 11.26 against torch's bf16 GEMM's 13.26 ms at 32 rows there."""
    return bf16_pairs() and pairs_beat_widening(cpu_vendor())


@dataclass(frozen=True)
class NestedScales:
    """bitsandbytes' double quantization of the block scales: absmax[b] = code2[absmax8[b]] *
    absmax2[b // 256] + offset. absmax2: [blocks / 256] float32; code2: [256] float32."""

    absmax2: torch.Tensor
    code2: torch.Tensor
    offset: float


@dataclass(frozen=True)
class Packed4bit:
    """A bitsandbytes 4-bit weight as the kernels read it (the same bytes, not a copy).

    packed: [N * K / 2] uint8, two codes per byte, high nibble first; absmax: [N * K /
    blocksize] float32, or uint8 when `nested` (double quantization) says how to decode it;
    code: [16].
    """

    packed: torch.Tensor
    absmax: torch.Tensor
    code: torch.Tensor
    blocksize: int
    out_features: int
    in_features: int
    nested: NestedScales | None

    @classmethod
    def of(cls, layer: bnb.nn.Linear4bit) -> Packed4bit | None:
        """The layer's weight, or None when the kernels cannot read it as it is stored."""
        params: Any = layer.weight  # a bitsandbytes Params4bit
        state = params.quant_state
        if getattr(state, "packing_format_for_cpu", False) or len(state.shape) != 2:
            return None
        out_features, in_features = state.shape
        blocksize = state.blocksize
        if in_features % blocksize or blocksize < 32 or blocksize & (blocksize - 1):
            return None
        nested = None
        if state.nested:
            if state.state2.blocksize != 256:
                return None
            nested = NestedScales(
                state.state2.absmax.float().contiguous(),
                state.state2.code.float().contiguous(),
                float(state.offset),
            )
        return cls(
            layer.weight.data.view(torch.uint8).reshape(-1),
            state.absmax.contiguous() if nested else state.absmax.float().contiguous(),
            state.code.float().contiguous(),
            state.blocksize,
            out_features,
            in_features,
            nested,
        )

    def scales(self) -> torch.Tensor:
        """[N * K / blocksize] float32: the block scales, decoded when double-quantized."""
        if self.nested is None:
            return self.absmax
        codes = self.nested.code2[self.absmax.long()]
        per_block = self.nested.absmax2.repeat_interleave(256)[: self.absmax.numel()]
        return codes * per_block + self.nested.offset

    def dequantize(self) -> torch.Tensor:
        """[N, K] float32: bitsandbytes' own dequantization."""
        return torch.ops.bitsandbytes.dequantize_4bit(
            self.packed,
            self.scales(),
            self.blocksize,
            "fp4" if self.code[1] > 0 else "nf4",
            (self.out_features, self.in_features),
            torch.float32,
        )

    def matmul(
        self, ops: Any, rows: torch.Tensor, bias: torch.Tensor | None, invariant: bool = False
    ) -> torch.Tensor:
        """rows [M, K] fp32 -> [M, N] through the fused kernel (by its batch-invariant paths
        where `invariant`)."""
        n = self.nested
        return ops.linear_4bit(
            rows, self.packed, self.absmax, self.code, self.blocksize, self.out_features, bias,
            None if n is None else n.absmax2, None if n is None else n.code2,
            0.0 if n is None else n.offset, invariant,
        )  # fmt: skip


# What the group kernels' lists hold where a weight has no bias or no nested scales: an empty
# tensor (a list of optional tensors is what TorchScript's tracer, which records CPU decode
# steps in `decode_traces`, cannot take).
_ABSENT = torch.empty(0)


def matmul_group(
    ops: Any,
    rows: torch.Tensor,
    weights: list[Packed4bit],
    biases: list[torch.Tensor | None],
    invariant: bool = False,
) -> list[torch.Tensor]:
    """rows [M, K] -> [M, N_i] for each weight, in one kernel call: fp32 rows by the fused
    kernel, bf16 rows by the bf16 kernel (`amx_tiles()` or `bf16_pairs()`: pair dot products
    only where `invariant`), each by its batch-invariant paths where `invariant`, each output in
    its rows' dtype."""
    nested = [w.nested for w in weights]
    arguments = (
        rows, [w.packed for w in weights], [w.absmax for w in weights],
        [w.code for w in weights], [w.blocksize for w in weights],
        [w.out_features for w in weights], [_ABSENT if b is None else b for b in biases],
        [_ABSENT if n is None else n.absmax2 for n in nested],
        [_ABSENT if n is None else n.code2 for n in nested],
        [0.0 if n is None else n.offset for n in nested],
    )  # fmt: skip
    kernel = ops.linear_4bit_bf16 if rows.dtype == torch.bfloat16 else ops.linear_4bit_group
    return kernel(*arguments, invariant)


class BaseLinear(nn.Module):
    """y = base(x) by the fastest path this call's rows allow; the wrapped module is kept."""

    def __init__(self, module: nn.Linear) -> None:
        super().__init__()
        self.module = module
        self.in_features = module.in_features
        self.out_features = module.out_features
        weight = module.weight
        if isinstance(module, bnb.nn.Linear4bit):
            # On CPUs with AVX512-BF16, bitsandbytes repacks a Linear4bit's weight in place at
            # its first CPU forward in eval mode (bf16 compute), into a layout that neither the
            # kernels nor DoRA's weight norms read, keeping the old bytes alive beside the new.
            module.support_avx512bf16_for_cpu = False
        on_cpu = weight.device.type == "cpu" and native() is not None
        self.packed = (
            Packed4bit.of(module) if on_cpu and isinstance(module, bnb.nn.Linear4bit) else None
        )
        self.dense = on_cpu and type(module) is nn.Linear and weight.dtype == torch.float32
        self.dense_bf16 = on_cpu and type(module) is nn.Linear and weight.dtype == torch.bfloat16
        # an output projection held in 8 bits (int8_output), which the kernels read
        self.int8 = module if on_cpu and isinstance(module, Int8Linear) else None
        self.narrowed = False  # the fp32 weight's values, held in bf16 (`hold_narrow`)
        self.group: SharedInputGroup | None = None
        self.invariant = False  # batch-invariant kernel paths only (`make_batch_invariant`)

    def hold_narrow(self, weight: nn.Parameter) -> None:
        """Run on `weight` [out, in] bf16, which holds the dense fp32 weight's values exactly
        (`model/narrow.py` checks), in its place: the kernel widens it as it reads it."""
        if not self.dense or weight.dtype != torch.bfloat16:
            raise ValueError("only a dense fp32 weight is held in bf16")
        self.module.weight = weight
        self.narrowed = True

    def project(self, rows: torch.Tensor) -> torch.Tensor | None:
        """rows [M, in] float32 -> rows W^T [M, out], without the bias, by the CPU's
        small-batch kernels; None where they do not take this projection or this many rows."""
        ops = native()
        if ops is None or rows.dtype != torch.float32 or rows.shape[0] > SMALL_BATCH_ROWS:
            return None
        return self._small_batch(ops, rows.contiguous(), None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., in] -> [..., out]."""
        ops = native()
        if ops is not None and self._in_bf16_kernel(x):
            return self._bf16_kernel(ops, x)
        if ops is None or (x.dtype != torch.float32 and not self._widens(x)):
            return self.module(x)
        rows = x.reshape(-1, self.in_features)
        if x.dtype != torch.float32 or not rows.is_contiguous():  # `to` costs a call even as is
            rows = rows.to(torch.float32, memory_format=CONTIGUOUS)
        small = rows.shape[0] <= SMALL_BATCH_ROWS or self.invariant
        if small and self.group is not None:
            y = self.group.output(self, ops, x, rows)
        else:
            bias = self.bias()
            y = self._small_batch(ops, rows, bias) if small else None
            if y is None and self.packed is not None:
                y = F.linear(rows, self.packed.dequantize(), bias)
            elif y is None and self.narrowed:
                y = F.linear(rows, self.module.weight.float(), bias)
            elif y is None and self.int8 is not None:
                y = F.linear(rows, self.int8.dequantized(), bias)
            elif y is None:
                return self.module(x)
        y = y.view(*x.shape[:-1], self.out_features)
        return y if x.dtype == torch.float32 else y.to(x.dtype)

    def _in_bf16_kernel(self, x: torch.Tensor) -> bool:
        """Whether bf16 x (bf16 compute) is multiplied by the weight in the bf16 kernel: at any
        row count where `invariant` (in AMX tiles, where a row's sums never depend on the
        others, or by the batch-invariant pair dot products)."""
        if x.dtype != torch.bfloat16 or self.in_features % BF16_STEP_K:
            return False
        if self.invariant:
            bf16_kernel = amx_tiles() or bf16_pairs()
            return bf16_kernel and (self.packed is not None or self.dense_bf16)
        rows = x.numel() // self.in_features
        if amx_tiles():
            if self.packed is not None:
                return AMX_TILE_MIN_ROWS <= rows <= SMALL_BATCH_ROWS
            if self.int8 is not None:
                return AMX_TILE_MIN_ROWS <= rows <= AMX_DENSE_MAX_ROWS
            return self.dense_bf16 and rows <= AMX_DENSE_MAX_ROWS
        if bf16_pairs():
            if self.packed is not None:
                fewest = 1 if self.packed.blocksize >= GEMV_BF16_MIN_BLOCK else PAIRS_MIN_ROWS
                return bf16_pairs_take_4bit() and fewest <= rows <= SMALL_BATCH_ROWS
            return self.dense_bf16 and rows <= SMALL_BATCH_ROWS
        return False

    def _bf16_kernel(self, ops: Any, x: torch.Tensor) -> torch.Tensor:
        """x [..., in] bf16 -> [..., out] bf16, by the bf16 kernel (see `_in_bf16_kernel`); a
        batch-invariant call of more rows than one kernel call takes, a call's worth at a time
        (each row's bits are its own whatever shares its call)."""
        rows = x.reshape(-1, self.in_features).contiguous()
        if rows.shape[0] > SMALL_BATCH_ROWS:
            parts = rows.split(SMALL_BATCH_ROWS)
            y = torch.cat([self._bf16_rows(ops, part.contiguous()) for part in parts])
        elif self.group is not None and self.packed is not None:
            y = self.group.output(self, ops, x, rows)
        else:
            y = self._bf16_rows(ops, rows)
        return y.view(*x.shape[:-1], self.out_features)

    def _bf16_rows(self, ops: Any, rows: torch.Tensor) -> torch.Tensor:
        """rows [M, in] bf16, M at most SMALL_BATCH_ROWS -> [M, out] bf16 by the bf16 kernel."""
        if self.int8 is not None:
            codes, scales = self.int8.weight, self.int8.scales
            return ops.linear_int8_bf16(rows, codes, scales, self.bias(), self.invariant)
        if self.packed is None:
            return ops.linear_bf16(rows, self.module.weight, self.bias(), self.invariant)
        return matmul_group(ops, rows, [self.packed], [self.bias()], self.invariant)[0]

    def _widens(self, x: torch.Tensor) -> bool:
        """Whether a 16-bit x (bf16 or fp16 compute) takes the 4-bit kernel, widened to fp32
        and its output rounded back, rather than bitsandbytes' dequantize of the whole weight to
        x's dtype and a GEMM in it (which more rows keep where torch's GEMMs run in AMX tiles:
        where the kernels may use them, `amx_tiles`; a CPU that has tiles its OS withholds, as
        Linux before 5.16 does, runs torch's bf16 GEMMs without them). Batch-invariant, every
        16-bit x the bf16 kernel does not take widens (fp16, or a CPU without AVX512-BF16). An
        8-bit output projection (`int8_output`) always widens."""
        if x.dtype not in NARROW_DTYPES:
            return False
        if self.int8 is not None:
            return True
        if self.invariant:
            return self.packed is not None or self.dense_bf16
        rows = x.numel() // self.in_features
        most = AMX_WIDENED_MAX_ROWS if amx_tiles() else SMALL_BATCH_ROWS
        return self.packed is not None and rows <= most

    def bias(self) -> torch.Tensor | None:
        """[out] float32, or None."""
        return None if self.module.bias is None else self.module.bias.float()

    def _small_batch(
        self, ops: Any, rows: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor | None:
        """rows [M, in] float32, contiguous, M at most SMALL_BATCH_ROWS -> [M, out] by the
        small-batch kernels; None where they do not take this projection."""
        if self.packed is not None:
            return self.packed.matmul(ops, rows, bias, self.invariant)
        if self.dense or (self.invariant and self.dense_bf16):  # a bf16 weight widens exactly
            return ops.linear_f32(rows, self.module.weight, bias, self.invariant)
        if self.int8 is not None:
            codes, scales = self.int8.weight, self.int8.scales
            return ops.linear_int8(rows, codes, scales, bias, self.invariant)
        return None


class SharedInputGroup:
    """4-bit projections the model calls one after another on the same input tensor.

    The first member called with a tensor computes every member's output for it in one kernel
    call and keeps the others'; a member called with that same tensor object takes its output.
    Any other call (another tensor, or a member whose output was taken) computes them all again.
    This holds the model to one contract, which transformers' attention and MLP modules keep:
    nothing writes into the input between the members' calls (inference tensors have no version
    counter to check it by).
    """

    def __init__(self, members: list[BaseLinear]) -> None:
        self.members = members
        self.weights = [m.packed for m in members if m.packed is not None]
        if len(self.weights) != len(members) or len({m.in_features for m in members}) != 1:
            raise ValueError("a shared-input group needs 4-bit projections of one input size")
        self.biases = [m.bias() for m in members]  # the base's: fixed while it serves
        self._input: torch.Tensor | None = None
        self._pending: dict[int, torch.Tensor] = {}  # member index -> its output for _input
        for member in members:
            member.group = self

    def output(
        self, member: BaseLinear, ops: Any, x: torch.Tensor, rows: torch.Tensor
    ) -> torch.Tensor:
        """`member`'s output [M, out] for x, whose rows [M, in] (float32, or bf16 for the bf16
        kernel: see `matmul_group`) are `rows`."""
        index = self.members.index(member)
        if x is self._input and index in self._pending:
            output = self._pending.pop(index)
            if not self._pending:
                self._input = None
            return output
        outputs = matmul_group(ops, rows, self.weights, self.biases, member.invariant)
        self._input = x
        self._pending = {i: y for i, y in enumerate(outputs) if i != index}
        return outputs[index]


def wrap_projections(model: nn.Module) -> int:
    """Wrap, in place, every `nn.Linear` of `model` that no `BaseLinear` runs yet (projections
    no adapter targets, the output projection) in one; returns how many."""
    targets = [
        (parent, name, child)
        for parent in model.modules()
        if not isinstance(parent, BaseLinear)
        for name, child in parent.named_children()
        if isinstance(child, nn.Linear)
    ]
    for parent, name, child in targets:
        setattr(parent, name, BaseLinear(child))
    return len(targets)


def base_linear_of(module: nn.Module | None) -> BaseLinear | None:
    """The `BaseLinear` `module` runs its matmul through: itself, or its direct child (a wrapper
    such as a LoRA layer keeps it as one); None for anything else."""
    if module is None or isinstance(module, BaseLinear):
        return module
    return next((m for m in module.children() if isinstance(m, BaseLinear)), None)


def make_batch_invariant(model: nn.Module) -> None:
    """Hold every `BaseLinear` of `model` to the kernels' batch-invariant paths: a row's outputs
    get the bits they would beside any other rows, at any row count (bf16 rows by the pair dot
    products, or widened to fp32 where AMX tiles would take them). Raises ValueError where a
    projection is not the kernels' to run (on a GPU, without compiled kernels, a weight in a
    format they do not read): torch's GEMMs pick their blocking by the rows they get."""
    projections = [m for m in model.modules() if isinstance(m, BaseLinear)]
    others = [
        m
        for m in projections
        if m.packed is None and m.int8 is None and not (m.dense or m.dense_bf16)
    ]
    if native() is None or others:
        raise ValueError(
            "batch_invariant needs loraserve's CPU kernels to run every projection; "
            f"{len(others) if native() else 'all'} of {len(projections)} would run through "
            "torch (a GPU, no compiled kernels, or weights in a format they do not read)"
        )
    for projection in projections:
        projection.invariant = True


# Sibling projections by their names in a module, as transformers' Llama-style models call them.
SHARED_INPUT_NAMES = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def link_shared_inputs(model: nn.Module) -> list[SharedInputGroup]:
    """Link the 4-bit projections each module of `model` calls on one input, named as in
    SHARED_INPUT_NAMES (any two or more of a set that run through `BaseLinear`s)."""
    groups = []
    for parent in model.modules():
        for names in SHARED_INPUT_NAMES:
            children = [getattr(parent, name, None) for name in names]
            bases = [base_linear_of(c) for c in children if isinstance(c, nn.Module)]
            present = [b for b in bases if b is not None and b.packed is not None]
            if len(present) >= 2 and len({b.in_features for b in present}) == 1:
                groups.append(SharedInputGroup(present))
    return groups
