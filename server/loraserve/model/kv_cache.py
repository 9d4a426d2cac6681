"""Paged KV cache that plugs into unmodified transformers attention code.

`PagedKVCache` owns one key and one value pool per layer, each `[num_blocks * block_size,
kv_heads, head_dim]`, addressed by block: `model/blocks.py` hands out the blocks (block 0, the
scratch block, never) and a sequence holds a list of block ids (its block table).

The model calls `update(keys, values, layer_idx)` from each attention layer; before every
forward the runner calls `prepare(write_slots)` with the flat pool index of each new token, so
`update` writes the tokens into the pools. It returns them unchanged: the attention
implementation (`model/attention.py`) reads each row's context from `pools(layer_idx)` itself.
`copy_block` fills the first positions of a block from another's (a prompt's next tokens found
in a cached block that another sequence goes on writing).

The pools may hold a narrower dtype than the model computes in (`kv_cache_dtype`: bf16 or
fp16 under fp32 compute): each new key and value is rounded to it as it is written, and every
reader widens what it reads, so all attention (decode and prefill, with or without the prefix
cache) sees the same rounded context. Or int8 codes: each token's head of keys (or values) is
quantized as it is written (`quantize_heads`: one float32 scale per token and head, in scale
pools [S, KVH] beside the code pools), and readers take codes times their scale.

Knows nothing about sequences, adapters, masks or scheduling: only flat pool indices.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers.cache_utils import Cache

from loraserve.model import huge_pages
from loraserve.model.kernels import KERNEL_DTYPES, native
from loraserve.model.loading import DTYPES

# What the pools may hold, by the names `kv_cache_dtype` gives them ("compute": the model's own).
POOL_DTYPES = {**DTYPES, "int8": torch.int8}
DTYPE_NAMES = {dtype: name for name, dtype in POOL_DTYPES.items()}


def quantize_heads(states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """states [..., D] (a float dtype) -> int8 codes [..., D] and float32 scales [...]: each
    head's scale is its largest magnitude / 127 (NaN where it holds a NaN), each code x / scale
    rounded to the nearest integer, ties to even, clamped to [-127, 127], and 0 where x / scale
    is not finite (a head of zeros; one holding an infinity then reads back as NaN). The
    compiled `kv_write_int8_` computes the same bits."""
    x = states.float()
    scales = x.abs().amax(-1) / 127
    quotient = x / scales.unsqueeze(-1)
    codes = torch.where(quotient.isfinite(), quotient.round().clamp(-127, 127), 0)
    return codes.to(torch.int8), scales


@dataclass(frozen=True)
class LayerPools:
    """One layer's key and value pools, [S, KVH, D] each; where they hold int8 codes, the
    scales [S, KVH] float32 that each token's head of codes is multiplied by (else None)."""

    keys: torch.Tensor
    values: torch.Tensor
    key_scales: torch.Tensor | None = None
    value_scales: torch.Tensor | None = None

    def gathered(
        self, slots: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys and values at pool indices slots [...] -> [..., KVH, D] each, in `dtype`:
        widened, or codes times their scales."""
        return (
            _read(self.keys, self.key_scales, slots, dtype),
            _read(self.values, self.value_scales, slots, dtype),
        )


def _read(
    pool: torch.Tensor, scales: torch.Tensor | None, slots: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    if scales is None:
        return pool[slots].to(dtype)
    return (pool[slots].float() * scales[slots].unsqueeze(-1)).to(dtype)


class PagedKVCache(Cache):
    """A transformers `Cache` over block-paged pools, indexed per step by the runner."""

    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        super().__init__(layers=[])
        self.block_size = block_size
        pool_shape = (num_blocks * block_size, kv_heads, head_dim)
        self.key_pools = [huge_pages.zeros(pool_shape, dtype, device) for _ in range(num_layers)]
        self.value_pools = [huge_pages.zeros(pool_shape, dtype, device) for _ in range(num_layers)]
        scale_layers = num_layers if dtype == torch.int8 else 0  # [S, KVH] each, for codes
        self.key_scales = [
            huge_pages.zeros(pool_shape[:2], torch.float32, device) for _ in range(scale_layers)
        ]
        self.value_scales = [
            huge_pages.zeros(pool_shape[:2], torch.float32, device) for _ in range(scale_layers)
        ]
        self._write_slots = torch.zeros(0, dtype=torch.int64, device=device)

    def pools(self, layer_idx: int) -> LayerPools:
        """The layer's key and value pools, each [num_slots, kv_heads, head_dim] (int8 ones with
        their scales)."""
        if not self.key_scales:
            return LayerPools(self.key_pools[layer_idx], self.value_pools[layer_idx])
        return LayerPools(
            self.key_pools[layer_idx], self.value_pools[layer_idx],
            self.key_scales[layer_idx], self.value_scales[layer_idx],
        )  # fmt: skip

    def prepare(self, write_slots: torch.Tensor) -> None:
        """Set where the next forward writes: write_slots [N] int64, one pool index per token."""
        self._write_slots = write_slots

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """key_states, value_states: [1, kv_heads, N, head_dim], written to the pools; returned
        unchanged."""
        pools = self.pools(layer_idx)
        ops = native() if pools.keys.device.type == "cpu" else None
        writes = (
            (pools.keys, pools.key_scales, key_states),
            (pools.values, pools.value_scales, value_states),
        )
        for pool, scales, states in writes:
            if scales is not None:
                self._write_codes(pool, scales, states[0], ops)
                continue
            source = states[0].to(pool.dtype)  # [kv_heads, N, head_dim], rounded to the pool's
            if ops is not None and pool.dtype in KERNEL_DTYPES and source.stride(-1) == 1:
                ops.kv_write_(pool, self._write_slots, source)  # one copy per token and head
            else:
                pool.index_copy_(0, self._write_slots, source.transpose(0, 1))
        return key_states, value_states

    def _write_codes(
        self, pool: torch.Tensor, scales: torch.Tensor, states: torch.Tensor, ops: Any
    ) -> None:
        """states [kv_heads, N, head_dim] quantized into an int8 pool and its scales (by the
        compiled kernels' `kv_write_int8_` where `ops` is them, else by torch)."""
        if ops is not None and states.dtype in KERNEL_DTYPES and states.stride(-1) == 1:
            ops.kv_write_int8_(pool, scales, self._write_slots, states)
            return
        codes, head_scales = quantize_heads(states.transpose(0, 1))  # [N, kv_heads, ...]
        pool.index_copy_(0, self._write_slots, codes)
        scales.index_copy_(0, self._write_slots, head_scales)

    def copy_block(self, source: int, target: int, positions: int) -> None:
        """Copy the first `positions` of block `source` into block `target`, in every pool."""
        source_at, target_at = source * self.block_size, target * self.block_size
        for pool in (*self.key_pools, *self.value_pools, *self.key_scales, *self.value_scales):
            pool[target_at : target_at + positions] = pool[source_at : source_at + positions]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0

    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def dtype(self) -> torch.dtype:
        """What the pools hold keys and values in."""
        return self.key_pools[0].dtype

    @property
    def dtype_name(self) -> str:
        """`dtype` as the settings name it: fp32, bf16, fp16 or int8."""
        return DTYPE_NAMES[self.dtype]

    def bytes_per_token(self) -> int:
        """What one token's keys and values take in every layer's pools, scales included."""
        pool = self.key_pools[0]
        per_head = pool.shape[2] * pool.element_size() + 4 * bool(self.key_scales)
        return 2 * len(self.key_pools) * pool.shape[1] * per_head
