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
cache) sees the same rounded context.

Knows nothing about sequences, adapters, masks or scheduling: only flat pool indices.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache

from loraserve.model import huge_pages
from loraserve.model.kernels import KERNEL_DTYPES, native


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
        self._write_slots = torch.zeros(0, dtype=torch.int64, device=device)

    def pools(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's key and value pools, each [num_slots, kv_heads, head_dim]."""
        return self.key_pools[layer_idx], self.value_pools[layer_idx]

    def prepare(self, write_slots: torch.Tensor) -> None:
        """Set where the next forward writes: write_slots [N] int64, one pool index per token."""
        self._write_slots = write_slots

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """key_states, value_states: [1, kv_heads, N, head_dim], written to the pools; returned
        unchanged."""
        key_pool, value_pool = self.pools(layer_idx)
        ops = native()
        if key_pool.device.type != "cpu" or key_pool.dtype not in KERNEL_DTYPES:
            ops = None
        for pool, states in ((key_pool, key_states), (value_pool, value_states)):
            source = states[0].to(pool.dtype)  # [kv_heads, N, head_dim], rounded to the pool's
            if ops is not None and source.stride(-1) == 1:
                ops.kv_write_(pool, self._write_slots, source)  # one copy per token and head
            else:
                pool.index_copy_(0, self._write_slots, source.transpose(0, 1))
        return key_states, value_states

    def copy_block(self, source: int, target: int, positions: int) -> None:
        """Copy the first `positions` of block `source` into block `target`, in every pool."""
        source_at, target_at = source * self.block_size, target * self.block_size
        for pool in (*self.key_pools, *self.value_pools):
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

    def bytes_per_token(self) -> int:
        pool = self.key_pools[0]
        return 2 * len(self.key_pools) * pool.shape[1] * pool.shape[2] * pool.element_size()
