"""Attention over the paged KV cache, plugged into transformers' attention interface.

`paged_attention` is registered as the attention implementation "loraserve_paged", so the
unmodified transformers model code calls it in every attention layer. One forward's tokens are
every row's new tokens laid end to end (batch size 1, no padding); the model's cache has already
written their keys and values into the pools when it is called. An `AttentionBatch`, passed as a
keyword of the model call, says which tokens belong to which row:

- decode rows (one new token) are attended together: on the CPU by one compiled kernel call
  that reads each row's keys and values in place through its block table (pools in fp32, bf16
  or fp16, widened as they are read, or int8 codes with their scales; the arithmetic in fp32
  whatever the compute dtype), never copying the context; elsewhere (CUDA) by one SDPA call
  over their contexts gathered into a padded batch (int8 codes read back times their scales),
  which is also the kernel's test oracle (the batch's pool slots and mask are built once per
  forward and window, for every layer);
- prefill rows (a prompt chunk) attend causally from the chunk's first position (and within the
  sliding window, where the layer has one) over their context, the chunk included: on the CPU
  those with chunks up to `KERNEL_MAX_CHUNK` by one compiled kernel call that reads the pools
  in place through the rows' block tables (a cached prefix or an earlier chunk is never
  copied); longer chunks, and every row elsewhere, by one SDPA call each over the row's context,
  which is this forward's own keys and values for a new prompt (where the pools hold the
  compute dtype: the same values), else gathered from the pools (the kernel's test oracle).

A layer whose attention needs what these do not compute (logit softcapping, attention sinks:
the `VARIANTS` keywords it passes) is attended by its architecture's own eager attention
function instead, over the same gathered contexts with the same causal and window masks, so
the paged cache serves every architecture; the first call of each kind of layer logs which
path it takes. Called without an `AttentionBatch` (a plain forward of the model) it is
transformers' SDPA attention, or the architecture's eager attention for those layers.

Knows nothing about sequences, adapters or scheduling: rows are token ranges and pool indices.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import cast

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from loraserve.model.kernels import KERNEL_DTYPES, native
from loraserve.model.kv_cache import LayerPools, PagedKVCache

log = logging.getLogger(__name__)

IMPLEMENTATION = "loraserve_paged"
# Keywords of attention variants the paged kernels and SDPA do not compute; a layer that passes
# one is attended by its architecture's eager attention, never by plain softmax attention.
VARIANTS = ("softcap", "s_aux", "sinks")
_logged_kinds: set[tuple[str, tuple[str, ...], bool]] = set()
# The SDPA backends a forward may use (`torch.nn.attention.sdpa_kernel`): all but cuDNN's, which
# builds a graph for every new shape, and a decode batch's padded context is longer every step.
SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


@dataclass(frozen=True)
class PrefillRow:
    """`count` new tokens at packed positions [first, first + count), sequence positions
    [start, start + count); block_table: [B] int64, the row's blocks."""

    first: int
    count: int
    start: int
    block_table: torch.Tensor


@dataclass(frozen=True)
class PrefillTables:
    """The prefill rows as the compiled kernel reads them, in their order: firsts, counts,
    starts [P] int64 (as each `PrefillRow`'s); block_tables [P, B] int32."""

    firsts: torch.Tensor
    counts: torch.Tensor
    starts: torch.Tensor
    block_tables: torch.Tensor

    def picked(self, keep: torch.Tensor) -> PrefillTables:
        """The rows where keep [P] bool is true."""
        return PrefillTables(
            self.firsts[keep], self.counts[keep], self.starts[keep], self.block_tables[keep]
        )


# The longest prefill chunk the compiled kernel attends, by the queries' dtype; longer chunks go
# to SDPA, whose blocked GEMMs outrun the kernel's broadcasts on large tiles (AMX's, in bf16).
# One-off timings on the 2-core AMX Xeon, 2026-12-01: prefill steps of the default model, the
# limit at 0 (all SDPA) / 128 / 256 / past every chunk, medians of 3 alternating: bf16, 32
# prompts of 64-128 tokens 494 / 446 / 460 / 454 ms, 8 of 192 248 / 246 / 254 / 247, 8 of 320
# 386 / 382 / 382 / 413, one of 2,000 392 / 411 / 389 / 580; fp32 (0 / 512 / 1,024 / past),
# 8 of 528 2,792 / 2,795 / 2,745 / 2,696, one of 2,000 1,533 / 1,539 / 1,530 / 1,622.
KERNEL_MAX_CHUNK = {torch.float32: 1024}
KERNEL_MAX_CHUNK_16_BIT = 192


@dataclass(frozen=True)
class PrefillSplit:
    """The prefill rows the compiled kernel attends (None: none) and the rest, for SDPA."""

    kernel: PrefillTables | None
    sdpa: tuple[PrefillRow, ...]


@dataclass(frozen=True)
class DecodeRows:
    """Rows with one new token each.

    tokens: [R] int64, each row's token in the packed sequence; block_tables: [R, B] int32;
    context_lens: [R] int32, context length including the new token; longest: the largest of
    context_lens, as the host knows it; use_kernel: whether the compiled kernel attends them
    (else the gathered batch does).
    """

    tokens: torch.Tensor
    block_tables: torch.Tensor
    context_lens: torch.Tensor
    longest: int
    use_kernel: bool


@dataclass(frozen=True)
class GatheredContext:
    """Decode rows' contexts as a padded batch of L = the longest context: slots [R, L] int64,
    each position's pool index (0 where padded); visible [R, L] bool; bias [R, 1, 1, L] in the
    queries' dtype, 0 where visible and -inf elsewhere (how SDPA reads `visible`)."""

    slots: torch.Tensor
    visible: torch.Tensor
    bias: torch.Tensor


@dataclass(frozen=True)
class AttentionBatch:
    """How one forward's packed tokens map onto the cache's pools. With no prefill rows, the
    decode rows' tokens are every token of the forward, in order. prefill_tables: the prefill
    rows as the compiled kernel takes them, None where it does not run. every_chunk_in_kernel:
    the kernel attends prefill chunks of any length (batch invariance: its sums for a query do
    not depend on the chunk the query came in, SDPA's do)."""

    cache: PagedKVCache
    decode: DecodeRows | None
    prefill: tuple[PrefillRow, ...]
    prefill_tables: PrefillTables | None = None
    every_chunk_in_kernel: bool = False
    _contexts: dict[tuple[int, torch.dtype], GatheredContext] = field(
        default_factory=dict, repr=False, compare=False
    )
    _splits: dict[torch.dtype, PrefillSplit] = field(
        default_factory=dict, repr=False, compare=False
    )
    _read_slots: dict[int, torch.Tensor] = field(default_factory=dict, repr=False, compare=False)

    def prefill_split(self, dtype: torch.dtype) -> PrefillSplit:
        """Which prefill rows the kernel attends for queries of `dtype` (chunks up to its
        `KERNEL_MAX_CHUNK`, or all with `every_chunk_in_kernel`; none without `prefill_tables`),
        decided by the first layer that asks and shared by the rest."""
        if dtype not in self._splits:
            limit = KERNEL_MAX_CHUNK.get(dtype, KERNEL_MAX_CHUNK_16_BIT)
            short = [row.count <= limit or self.every_chunk_in_kernel for row in self.prefill]
            if self.prefill_tables is None or not any(short):
                split = PrefillSplit(None, self.prefill)
            else:
                kernel = self.prefill_tables
                if not all(short):
                    kernel = kernel.picked(torch.tensor(short))
                rest = tuple(row for row, fits in zip(self.prefill, short, strict=True) if not fits)
                split = PrefillSplit(kernel, rest)
            self._splits[dtype] = split
        return self._splits[dtype]

    def read_slots(self, row: PrefillRow) -> torch.Tensor:
        """[start + count] int64: the pool index of every position of a prefill row's context,
        new tokens included; built by the first layer that asks and shared by the rest."""
        if row.first not in self._read_slots:
            bs = self.cache.block_size
            context = torch.arange(row.start + row.count, device=row.block_table.device)
            self._read_slots[row.first] = row.block_table[context // bs] * bs + context % bs
        return self._read_slots[row.first]

    def decode_context(self, window: int, dtype: torch.dtype) -> GatheredContext:
        """The decode rows' gathered contexts for layers of this window (0: none), built by the
        first layer that asks and shared by the rest."""
        key = (window, dtype)
        if key not in self._contexts:
            rows = self.decode
            if rows is None:
                raise ValueError("a batch without decode rows has no decode context")
            self._contexts[key] = decode_context(
                rows.block_tables, rows.context_lens, self.cache.block_size, window,
                rows.longest, dtype,
            )  # fmt: skip
        return self._contexts[key]


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
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """query: [1, H, N, D] (key, value: this forward's [1, KVH, N, D]) -> ([1, N, H, D], the
    attention weights where a plain forward's eager attention gives them, else None)."""
    variant = tuple(name for name in VARIANTS if kwargs.get(name) is not None)
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    window = sliding_window or 0
    if attention_batch is None and variant:
        n, context = query.shape[2], key.shape[2]
        visible = context_mask(context - n, n, context, window, query.device)
        mask = _additive(visible, query.dtype)[None, None]
        kwargs = dict(kwargs, dropout=dropout, sliding_window=sliding_window)
        return eager_attention_of(module)(module, query, key, value, mask, scaling=scale, **kwargs)
    if attention_batch is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
            sliding_window=sliding_window, **kwargs,
        )  # fmt: skip
    _log_path(module, variant, window)
    batch = attention_batch
    if variant:
        kwargs = dict(kwargs, sliding_window=sliding_window)
        return attend_eager(module, query[0].transpose(0, 1), batch, scale, window, kwargs), None
    q = query[0].transpose(0, 1)  # [N, H, D]
    pools = batch.cache.pools(cast(int, module.layer_idx))
    decode = batch.decode
    if decode is not None and not batch.prefill:  # every token, in order: no gather
        return attend_decode(q, pools, batch, window, scale)[None], None
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)  # [N, H, D] contiguous
    if decode is not None:
        out[decode.tokens] = attend_decode(q[decode.tokens], pools, batch, window, scale)
    ops, prefill = native(), batch.prefill
    if batch.prefill_tables is not None and ops is not None and q.stride(-1) == 1:
        split = batch.prefill_split(q.dtype)
        if split.kernel is not None:
            tables = split.kernel
            ops.paged_prefill_attention_(
                q, out, pools.keys, pools.values, tables.block_tables, tables.firsts,
                tables.counts, tables.starts, batch.cache.block_size, window, scale,
                k_scales=pools.key_scales, v_scales=pools.value_scales,
            )  # fmt: skip
        prefill = split.sdpa
    for row in prefill:
        rows = slice(row.first, row.first + row.count)
        if row.start == 0 and pools.keys.dtype == q.dtype:  # its context: this forward's states
            k, v = (states[0, :, rows].transpose(0, 1) for states in (key, value))
        else:
            k, v = pools.gathered(batch.read_slots(row), q.dtype)
        out[rows] = attend_context(q[rows], k, v, row.start, window, scale)
    return out.unsqueeze(0), None


def attend_decode(
    q: torch.Tensor, pools: LayerPools, batch: AttentionBatch, window: int, scale: float
) -> torch.Tensor:
    """The batch's decode rows' queries q [R, H, D] (D contiguous) over their contexts in the
    layer's pools -> [R, H, D]: by the compiled kernel where it applies (in fp32: 16-bit
    queries are widened as it reads them and its output rounded once, as SDPA accumulates
    them), else through the gathered batch."""
    rows = cast(DecodeRows, batch.decode)
    ops = native()
    if rows.use_kernel and ops is not None and q.stride(-1) == 1:
        return ops.paged_decode_attention(
            q, pools.keys, pools.values, rows.block_tables, rows.context_lens,
            batch.cache.block_size, window, scale,
            k_scales=pools.key_scales, v_scales=pools.value_scales,
        )  # fmt: skip
    return attend_gathered(q, pools, batch.decode_context(window, q.dtype), scale)


def attend_context(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int, window: int, scale: float
) -> torch.Tensor:
    """One row's new tokens over its whole context: q [n, H, D] at positions start..start+n-1,
    k, v [start + n, KVH, D] -> [n, H, D]. Query i sees keys j <= start + i (and start + i - j <
    window when window > 0)."""
    n, context = q.shape[0], k.shape[0]
    mask = context_mask(start, n, context, window, q.device) if start or window else None
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
    pools: LayerPools,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    block_size: int,
    window: int,
    scale: float,
) -> torch.Tensor:
    """The decode kernel's semantics in torch: q [R, H, D] over each row's context, gathered
    from the pools into a padded batch -> [R, H, D]."""
    longest = int(context_lens.max())
    context = decode_context(block_tables, context_lens, block_size, window, longest, q.dtype)
    return attend_gathered(q, pools, context, scale)


def attend_gathered(
    q: torch.Tensor, pools: LayerPools, context: GatheredContext, scale: float
) -> torch.Tensor:
    """q [R, H, D] over the rows' contexts gathered from the pools -> [R, H, D]."""
    k, v = (t.transpose(1, 2) for t in pools.gathered(context.slots, q.dtype))  # [R, KVH, L, D]
    out = F.scaled_dot_product_attention(
        q.unsqueeze(2), k, v, attn_mask=context.bias, scale=scale, enable_gqa=True
    )  # [R, H, 1, D]
    return out[:, :, 0]


def context_mask(
    start: int, n: int, context: int, window: int, device: torch.device
) -> torch.Tensor:
    """[n, context] bool: query i (at position start + i) sees key j when j <= start + i and,
    with a window, start + i - j < window."""
    query_pos = torch.arange(start, start + n, device=device)[:, None]
    key_pos = torch.arange(context, device=device)
    mask = key_pos <= query_pos
    if window:
        mask &= query_pos - key_pos < window
    return mask


def decode_context(
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    block_size: int,
    window: int,
    longest: int,
    dtype: torch.dtype,
) -> GatheredContext:
    """Decode rows' contexts as a padded batch of L = `longest` (the largest of context_lens)
    positions. block_tables: [R, B]; context_lens: [R]."""
    lens = context_lens.long()
    positions = torch.arange(longest, device=block_tables.device)  # [L]
    tables = block_tables.long()
    slots = tables[:, positions // block_size] * block_size + positions % block_size  # [R, L]
    visible = positions < lens[:, None]  # [R, L]
    if window:
        visible &= positions > lens[:, None] - 1 - window
    bias = torch.where(visible, 0.0, float("-inf")).to(dtype)[:, None, None, :]
    return GatheredContext(torch.where(visible, slots, 0), visible, bias)


EagerAttention = Callable[..., tuple[torch.Tensor, torch.Tensor | None]]


def attends_eagerly(model: torch.nn.Module) -> bool:
    """Whether some attention layer of `model` passes one of the `VARIANTS` keywords, as
    transformers' models do: logit softcapping from the config (`attn_logit_softcapping`), or
    attention sinks held as a `sinks` parameter."""
    config = getattr(model, "config", None)
    text = config.get_text_config() if config is not None else None
    if getattr(text, "attn_logit_softcapping", None):
        return True
    return any(isinstance(getattr(m, "sinks", None), torch.Tensor) for m in model.modules())


def eager_attention_of(module: torch.nn.Module) -> EagerAttention:
    """The eager attention function of the module's own modeling file (the one transformers
    falls back to), which computes the architecture's variants: softcapping, sinks, ..."""
    eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if eager is None:
        raise NotImplementedError(
            f"{type(module).__name__}: its attention needs what the paged kernels do not "
            "compute, and its modeling file has no eager attention function"
        )
    return eager


def attend_eager(
    module: torch.nn.Module,
    q: torch.Tensor,
    batch: AttentionBatch,
    scale: float,
    window: int,
    kwargs: dict,
) -> torch.Tensor:
    """The rows' attention by the architecture's eager function, over each row's context
    gathered from the pools with the paged path's masks: q [N, H, D] -> [1, N, H, D].
    kwargs: the layer's own keywords for it (softcap, sinks, ...)."""
    eager = eager_attention_of(module)
    out = torch.empty_like(q)
    pools = batch.cache.pools(cast(int, module.layer_idx))

    def attend(query, key, value, visible):  # [B, H, n, D], [B, KVH, L, D] x2, [B, n, L]
        mask = _additive(visible, query.dtype)[:, None]
        return eager(module, query, key, value, mask, dropout=0.0, scaling=scale, **kwargs)[0]

    if batch.decode is not None:
        context = batch.decode_context(window, q.dtype)
        k, v = (t.transpose(1, 2) for t in pools.gathered(context.slots, q.dtype))  # [R, KVH, L, D]
        tokens = batch.decode.tokens
        out[tokens] = attend(q[tokens].unsqueeze(2), k, v, context.visible[:, None])[:, 0]
    for row in batch.prefill:
        rows = slice(row.first, row.first + row.count)
        k, v = (t.transpose(0, 1)[None] for t in pools.gathered(batch.read_slots(row), q.dtype))
        visible = context_mask(row.start, row.count, k.shape[2], window, q.device)
        out[rows] = attend(q[rows].transpose(0, 1)[None], k, v, visible[None])[0]
    return out.unsqueeze(0)


def _additive(visible: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean mask as eager attention adds it: 0 where visible, the dtype's minimum else."""
    return torch.where(visible, 0.0, torch.finfo(dtype).min).to(dtype)


def _log_path(module: torch.nn.Module, variant: tuple[str, ...], window: int) -> None:
    """Say once per kind of layer (class, variant, sliding or not) which path attends it."""
    kind = (type(module).__name__, variant, bool(window))
    if kind in _logged_kinds:
        return
    _logged_kinds.add(kind)
    sliding = "sliding-window " if window else ""
    if variant:
        how = f"its architecture's eager attention ({', '.join(variant)}) over the paged cache"
    else:
        how = "the paged attention kernels"
    log.info("%s %slayers: %s", kind[0], sliding, how)


def paged_kernels_apply(cache: PagedKVCache) -> bool:
    """Whether decode and prefill rows over `cache` can use the compiled kernels: CPU pools of
    a dtype they read (fp32, bf16, fp16, int8 codes), whatever the compute dtype."""
    pool = cache.pools(0).keys
    readable = pool.dtype in KERNEL_DTYPES or pool.dtype == torch.int8
    return native() is not None and pool.device.type == "cpu" and readable


AttentionInterface.register(IMPLEMENTATION, paged_attention)
