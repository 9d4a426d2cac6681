"""Paged KV cache that plugs into unmodified transformers attention code.

`PagedKVCache` owns one key and one value pool per layer, each `[num_blocks * block_size,
kv_heads, head_dim]`. Block 0 is a scratch block that is never handed out (it absorbs writes
nobody reads). `BlockAllocator` hands out the other blocks; a sequence holds a list of block ids
(its block table).

The model calls `update(keys, values, layer_idx)` from each attention layer; before every
forward the runner calls `prepare(write_slots)` with the flat pool index of each new token, so
`update` writes the tokens into the pools. It returns them unchanged: the attention
implementation (`model/attention.py`) reads each row's context from `pools(layer_idx)` itself.

Knows nothing about sequences, adapters, masks or scheduling: only flat pool indices.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache

SCRATCH_BLOCK = 0


class BlockAllocator:
    """Free list of KV blocks; block 0 (scratch) is never handed out."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 2:
            raise ValueError("the KV cache needs at least 2 blocks (one is scratch)")
        self.block_size = block_size
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks - 1, SCRATCH_BLOCK, -1))

    @property
    def capacity_tokens(self) -> int:
        return (self.num_blocks - 1) * self.block_size

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    @property
    def used_blocks(self) -> int:
        return self.num_blocks - 1 - len(self._free)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def allocate(self, count: int) -> list[int]:
        if count > len(self._free):
            raise MemoryError(f"asked for {count} KV blocks, {len(self._free)} free")
        keep = len(self._free) - count
        taken = self._free[keep:]
        del self._free[keep:]
        return taken

    def free(self, blocks: list[int]) -> None:
        self._free.extend(blocks)


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
        self.key_pools = [
            torch.zeros(pool_shape, dtype=dtype, device=device) for _ in range(num_layers)
        ]
        self.value_pools = [
            torch.zeros(pool_shape, dtype=dtype, device=device) for _ in range(num_layers)
        ]
        self._write_slots: torch.Tensor | None = None

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
        for pool, states in ((key_pool, key_states), (value_pool, value_states)):
            pool.index_copy_(0, self._write_slots, states[0].transpose(0, 1).to(pool.dtype))
        return key_states, value_states

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0

    @property
    def is_compileable(self) -> bool:
        return False

    def bytes_per_token(self) -> int:
        pool = self.key_pools[0]
        return 2 * len(self.key_pools) * pool.shape[1] * pool.shape[2] * pool.element_size()
