"""Paged KV cache that plugs into unmodified transformers attention code.

`PagedKVCache` owns one key and one value pool per layer, each `[num_blocks * block_size,
kv_heads, head_dim]`. Block 0 is a scratch block: padding tokens write there and padded context
positions read from there, so no branch is needed for ragged rows. `BlockAllocator` hands out
the other blocks; a sequence holds a list of block ids (its block table).

The model calls `update(keys, values, layer_idx)` from each attention layer; before every
forward the runner calls `prepare(write_slots, read_slots)` with flat pool indices, so `update`
writes each row's new tokens at that row's own positions and returns each row's whole context.

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
        self._read_slots: torch.Tensor | None = None

    def prepare(self, write_slots: torch.Tensor, read_slots: torch.Tensor) -> None:
        """Set where the next forward writes and reads.

        write_slots: [B, T] int64, pool index for each new token (padding -> scratch block)
        read_slots:  [B, L] int64, pool index of each row's context position (padding -> scratch)
        """
        self._write_slots = write_slots.reshape(-1)
        self._read_slots = read_slots

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """key_states, value_states: [B, kv_heads, T, head_dim] -> [B, kv_heads, L, head_dim]."""
        key_pool, value_pool = self.key_pools[layer_idx], self.value_pools[layer_idx]
        kv_heads, head_dim = key_pool.shape[1:]
        key_pool.index_copy_(
            0, self._write_slots, key_states.transpose(1, 2).reshape(-1, kv_heads, head_dim)
        )
        value_pool.index_copy_(
            0, self._write_slots, value_states.transpose(1, 2).reshape(-1, kv_heads, head_dim)
        )
        return key_pool[self._read_slots].transpose(1, 2), value_pool[self._read_slots].transpose(
            1, 2
        )

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0 if self._read_slots is None else self._read_slots.shape[1]

    @property
    def is_compileable(self) -> bool:
        return False

    def bytes_per_token(self) -> int:
        pool = self.key_pools[0]
        return 2 * len(self.key_pools) * pool.shape[1] * pool.shape[2] * pool.element_size()
