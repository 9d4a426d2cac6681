"""Attention over the paged KV cache, plugged into transformers' attention interface.

`paged_attention` is registered as the attention implementation "loraserve_paged", so the
unmodified transformers model code calls it in every attention layer. One forward's tokens are
every row's new tokens laid end to end (batch size 1, no padding); the model's cache has already
written their keys and values into the pools when it is called. An `AttentionBatch`, passed as a
keyword of the model call, says which tokens belong to which row:

- decode rows (one new token) are attended together: on the CPU in fp32 by one compiled kernel
  call that reads each row's keys and values in place through its block table, never copying
  the context; elsewhere (CUDA, other dtypes) by one SDPA call over their contexts gathered
  into a padded batch, which is also the kernel's test oracle;
- prefill rows (a prompt chunk) each gather their context once and run one SDPA call, causal
  from the chunk's first position (and within the sliding window, where the layer has one).

Called without an `AttentionBatch` (a plain forward of the model) it is transformers' SDPA
attention.

Knows nothing about sequences, adapters or scheduling: rows are token ranges and pool indices.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from loraserve.model.kernels import native
from loraserve.model.kv_cache import PagedKVCache

IMPLEMENTATION = "loraserve_paged"
# Keywords of attention variants this implementation does not compute; a model that passes one
# must not silently get plain softmax attention.
UNSUPPORTED = ("softcap", "s_aux", "sinks")


@dataclass(frozen=True)
class PrefillRow:
    """`count` new tokens at packed positions [first, first + count), sequence positions
    [start, start + count); read_slots: [start + count] int64, the pool index of every position
    of the row's context, new tokens included."""

    first: int
    count: int
    start: int
    read_slots: torch.Tensor


@dataclass(frozen=True)
class DecodeRows:
    """Rows with one new token each.

    tokens: [R] int64, each row's token in the packed sequence; block_tables: [R, B] int32;
    context_lens: [R] int32, context length including the new token; use_kernel: whether the
    compiled kernel attends them (else the gathered batch does).
    """

    tokens: torch.Tensor
    block_tables: torch.Tensor
    context_lens: torch.Tensor
    use_kernel: bool


@dataclass(frozen=True)
class AttentionBatch:
    """How one forward's packed tokens map onto the cache's pools."""

    cache: PagedKVCache
    decode: DecodeRows | None
    prefill: tuple[PrefillRow, ...]


def paged_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    attention_batch: AttentionBatch | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """query: [1, H, N, D] (key, value: this forward's [1, KVH, N, D]) -> ([1, N, H, D], None)."""
    if attention_batch is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
            sliding_window=sliding_window, **kwargs,
        )  # fmt: skip
    if any(kwargs.get(name) is not None for name in UNSUPPORTED):
        raise NotImplementedError(f"{type(module).__name__}: attention variant not supported")
    batch = attention_batch
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    window = sliding_window or 0
    q = query[0].transpose(0, 1)  # [N, H, D]
    out = torch.empty_like(q)
    k_pool, v_pool = batch.cache.pools(cast(int, module.layer_idx))  # [S, KVH, D] each
    if batch.decode is not None:
        d, ops = batch.decode, native()
        attend = ops.paged_decode_attention if d.use_kernel and ops else attend_decode_gathered
        out[d.tokens] = attend(
            q[d.tokens].contiguous(), k_pool, v_pool, d.block_tables, d.context_lens,
            batch.cache.block_size, window, scale,
        )  # fmt: skip
    for row in batch.prefill:
        rows = slice(row.first, row.first + row.count)
        out[rows] = attend_context(
            q[rows], k_pool[row.read_slots], v_pool[row.read_slots], row.start, window, scale
        )
    return out.unsqueeze(0), None


def attend_context(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int, window: int, scale: float
) -> torch.Tensor:
    """One row's new tokens over its whole context: q [n, H, D] at positions start..start+n-1,
    k, v [start + n, KVH, D] -> [n, H, D]. Query i sees keys j <= start + i (and start + i - j <
    window when window > 0)."""
    n, context = q.shape[0], k.shape[0]
    mask = None
    if start or window:
        query_pos = torch.arange(start, start + n, device=q.device)[:, None]
        key_pos = torch.arange(context, device=q.device)
        mask = key_pos <= query_pos
        if window:
            mask &= query_pos - key_pos < window
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1).unsqueeze(0),
        k.transpose(0, 1).unsqueeze(0),
        v.transpose(0, 1).unsqueeze(0),
        attn_mask=mask,
        is_causal=mask is None,
        scale=scale,
        enable_gqa=True,
    )  # [1, H, n, D]
    return out[0].transpose(0, 1)


def attend_decode_gathered(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    block_size: int,
    window: int,
    scale: float,
) -> torch.Tensor:
    """The decode kernel's semantics in torch: q [R, H, D] over each row's context, gathered
    from the pools [S, KVH, D] into a padded batch [R, L] -> [R, H, D]."""
    lens = context_lens.long()
    positions = torch.arange(int(lens.max()), device=q.device)  # [L]
    tables = block_tables.long()
    slots = tables[:, positions // block_size] * block_size + positions % block_size  # [R, L]
    visible = positions < lens[:, None]  # [R, L]
    if window:
        visible &= positions > lens[:, None] - 1 - window
    slots = torch.where(visible, slots, 0)
    k = k_pool[slots].transpose(1, 2)  # [R, KVH, L, D]
    v = v_pool[slots].transpose(1, 2)
    out = F.scaled_dot_product_attention(
        q.unsqueeze(2), k, v, attn_mask=visible[:, None, None, :], scale=scale, enable_gqa=True
    )  # [R, H, 1, D]
    return out[:, :, 0]


def decode_kernel_applies(cache: PagedKVCache) -> bool:
    """Whether decode rows over `cache` can use the compiled kernel (fp32 pools on the CPU)."""
    pool = cache.pools(0)[0]
    return native() is not None and pool.device.type == "cpu" and pool.dtype == torch.float32


AttentionInterface.register(IMPLEMENTATION, paged_attention)
