"""loraserve's compiled CPU kernels, loaded once for this CPU's instruction set.

`native()` returns the `torch.ops.loraserve` namespace when the library for this CPU is built
(by `scripts/setup.sh`, or here on first use when a compiler is available), else None: every
caller then takes its torch path, which is also each kernel's test oracle. The ops:

  linear_f32(x [M, K], weight [N, K], bias?) -> [M, N]   (weight float32, or bfloat16 widened
                                                        exactly as it is read)
  linear_int8(x [M, K], codes [N, K] i8, scales [N], bias?) -> [M, N]  ((x @ codes^T) * scales:
                                                        an output projection held in 8 bits)
  linear_int8_bf16(x [M, K] bf16, codes, scales, bias?) -> [M, N] bf16  (the same, the codes
                                                        widened to bf16 into AMX tiles, where
                                                        amx_usable())
  linear_4bit(x [M, K], packed [N*K/2] u8, absmax [N*K/blocksize], code [16], blocksize, N,
              bias?) -> [M, N]                       (bitsandbytes NF4 / FP4 layout; blocksize a
                                                        power of two from 32)
  linear_4bit_bf16(x [M, K] bf16, [packed], [absmax], [code], [blocksize], [N], [bias], ...)
              -> [[M, N] bf16]                       (several linear_4bit weights, each rounded
                                                        to bf16 as bitsandbytes dequantizes it,
                                                        fp32 sums; in AMX tiles where
                                                        amx_usable(), else by AVX512-BF16's pair
                                                        dot products; M at most 256)
  linear_bf16(x [M, K] bf16, weight [N, K] bf16, bias?) -> [M, N] bf16  (the same for a bf16
                                                        weight, read in place)
  amx_usable() -> bool                                 (the AVX-512 build, a CPU with AMX-BF16,
                                                        and an OS that lets this process use
                                                        the tiles)
  bf16_pairs_usable() -> bool                          (the AVX-512 build on a CPU with
                                                        AVX512-BF16: the bf16 ops run here, in
                                                        tiles or not)
  paged_decode_attention(q [R, H, D], k_pool [S, KVH, D], v_pool, block_tables [R, B] i32,
                         context_lens [R] i32, block_size, window, scale, k_scales?,
                         v_scales?) -> [R, H, D]    (int8 pools: codes, each token's head
                                                        times its scale, k_scales and v_scales
                                                        [S, KVH] float32)
  paged_prefill_attention_(q [N, H, D], out [N, H, D], k_pool, v_pool, block_tables [P, B] i32,
                           firsts, counts, starts [P] i64, block_size, window, scale,
                           k_scales?, v_scales?)
                                                       (in place on out's rows of the P prefill
                                                        rows: causal over each row's context)
  lora_delta_(x [N, in], y [N, out], lora_a [S, R, in], lora_b [S, R, out],
              starts, ends, slots, ranks [G] i64, scales [S]?, narrow [S] bool?)
                                                       (in place on y; bf16 rows on bf16 slots in
                                                        AMX tiles, where amx_usable(), for chunks
                                                        of 8-16 tokens: x @ A^T rounded to bf16;
                                                        float32 slots flagged in narrow hold bf16
                                                        rows in their first half)
  transpose_scaled(src [[rows, cols]], scale [float]) -> [[cols, rows]] (each src^T * scale,
                                                        views of one buffer)
  nonfinite(tensors) -> [int]                          (positions of the tensors holding a NaN
                                                        or an infinity)
  lora_factors(a [[r, in]], b [[out, r]], scale [float]) -> [[r, in]], [[r, out]], [int]
                                                       (each a copied, each b^T * scale, views of
                                                        one buffer; the pairs holding a NaN or an
                                                        infinity, each checked as it is written)
  score_stats(scores [B, V]) -> argmax [B] i64, max [B], logsumexp [B]  (as torch's argmax,
                                                        amax and logsumexp, one op)
  rms_norm(x [M, D], weight [D], eps) -> [M, D]        (transformers' Llama RMSNorm)
  kv_write_(pool [S, KVH, D], slots [N] i64, states [KVH, N, D])  (pool[slots[n]] = states[:, n];
                                                        states strided, D contiguous)
  kv_write_int8_(pool [S, KVH, D] i8, scales [S, KVH], slots [N] i64, states [KVH, N, D])
                                                       (the same, each token's head quantized:
                                                        `kv_cache.quantize_heads`' bits)
  serial_thread()                                      (torch ops of the calling thread run
                                                        on it alone from then on)
  team_waits() -> (calls, seconds)                     (parallel calls run on a team so far, and
                                                        how long their callers waited at their
                                                        ends for the rest of the team)

All take contiguous float32 CPU tensors (linear_f32's weight: or bfloat16; lora_delta_'s
slots, and its x and y together, rms_norm's and rotary's tensors, each op's alike: or bfloat16
or float16; the attention ops' pools: or bfloat16 or float16, or int8 with their scales, their
q any of the three and any strides but D's, their output q's dtype; the bf16 ops: bfloat16
rows; transpose_scaled and lora_factors: any float dtype and strides; kv_write_'s and
kv_write_int8_'s states: any strides but D's, kv_write_int8_'s any of the three dtypes). Set
LORASERVE_KERNELS=off to use the torch paths, or to a variant's name (`build.VARIANTS`) to load
that one instead of this CPU's; LORASERVE_AMX=off keeps the bf16 ops out of AMX tiles (they
take AVX512-BF16's pair dot products, as on a CPU without tiles).

Knows nothing about models, adapters or batches: callers decide when an op applies.
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Any

import torch

from loraserve.model.kernels import build

log = logging.getLogger(__name__)


# Element dtypes the element-generic ops (KV pools, LoRA rows and slots, RMSNorm, rotary) read
# and write, widening to fp32 as they read.
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

OFF = ("0", "off", "false", "no")  # LORASERVE_KERNELS values that turn the kernels off


def _choice() -> str:
    return os.environ.get("LORASERVE_KERNELS", "on").lower()


def chosen_variant() -> build.Variant | None:
    """The build `native()` loads: the one LORASERVE_KERNELS names, else this CPU's; None when
    LORASERVE_KERNELS turns the kernels off or the CPU has no AVX2."""
    choice = _choice()
    return None if choice in OFF else build.VARIANTS.get(choice) or build.host_variant()


@functools.cache
def native() -> Any | None:
    """The loaded op namespace, or None when the kernels cannot run here (logged once)."""
    variant = chosen_variant()
    if variant is None:
        log.info(
            "LORASERVE_KERNELS=off: using the torch paths"
            if _choice() in OFF
            else "no AVX2 on this CPU: loraserve's CPU kernels are off, torch paths serve"
        )
        return None
    try:
        path = build.build(variant)
        torch.ops.load_library(str(path))
    except (OSError, RuntimeError) as error:
        log.warning("loraserve's CPU kernels are unavailable (%s); using the torch paths", error)
        return None
    log.info("loraserve %s CPU kernels loaded from %s", variant.name, path)
    return torch.ops.loraserve
