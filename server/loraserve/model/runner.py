"""One forward pass over a ragged batch of rows, through the unmodified transformers model.

Each row is one sequence's new tokens (a prefill chunk or one decode token), where its context
already lives in the paged KV cache, and which LoRA slot it uses. Rows are left-padded to one
length, so the last real token of every row sits at the last column and `logits_to_keep=1`
returns exactly one logit row per sequence. The runner builds per-row `position_ids`, an
explicit 4-D additive attention mask (causal, per-row context length, sliding window where the
config has one) and the cache's write / read indices.

Knows nothing about requests, sampling, scheduling or adapter names: rows carry slot numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from loraserve.model.kv_cache import PagedKVCache
from loraserve.model.lora import LoraBatch, LoraContext


@dataclass(frozen=True)
class RowInput:
    """One sequence in one forward: `tokens` to append after `start` cached positions."""

    tokens: list[int]
    start: int
    block_table: list[int]
    lora_slot: int = 0


def _attention_windows(config) -> dict[str, int | None] | int | None:
    """The sliding window per attention kind: a dict when layers mix kinds, else one value."""
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if layer_types and len(set(layer_types)) > 1:
        return {kind: (window if "sliding" in kind else None) for kind in set(layer_types)}
    if layer_types:
        return window if "sliding" in layer_types[0] else None
    return window


class ModelRunner:
    """Runs the model on a list of rows and returns the next-token logits of each row."""

    def __init__(
        self,
        model: PreTrainedModel,
        cache: PagedKVCache,
        lora: LoraContext,
        slot_ranks: list[int],
    ) -> None:
        self.model = model
        self.cache = cache
        self.lora = lora
        self.slot_ranks = slot_ranks  # slot -> rank of the adapter in it; shared, kept up to date
        self.device = next(model.parameters()).device
        self.dtype = cache.key_pools[0].dtype
        self.windows = _attention_windows(model.config)

    @torch.inference_mode()
    def forward(self, rows: list[RowInput]) -> torch.Tensor:
        """Append each row's tokens to its context; returns float32 logits [B, V] of last tokens.

        Rows run ordered by LoRA slot, so each adapter's tokens are one contiguous segment.
        """
        order = sorted(range(len(rows)), key=lambda i: rows[i].lora_slot)
        logits = self._forward([rows[i] for i in order])
        unsorted = torch.empty_like(logits)
        unsorted[order] = logits
        return unsorted

    def _forward(self, rows: list[RowInput]) -> torch.Tensor:
        def tensor(values: list) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.int64, device=self.device)

        bs = self.cache.block_size
        width = max(len(r.tokens) for r in rows)
        blocks = max(len(r.block_table) for r in rows)
        input_ids = tensor([[0] * (width - len(r.tokens)) + r.tokens for r in rows])  # [B, T]
        tables = tensor([r.block_table + [0] * (blocks - len(r.block_table)) for r in rows])
        starts = tensor([r.start for r in rows])  # [B]
        pad_cols = width - tensor([len(r.tokens) for r in rows])  # [B]
        ends = starts + width - pad_cols  # [B]: context length after this forward
        context = max(r.start + len(r.tokens) for r in rows)  # on the host: no device sync

        def pool_index(positions: torch.Tensor) -> torch.Tensor:
            """positions: [B, X] -> [B, X] index into the KV pools, via each row's blocks."""
            capped = positions.clamp(0, blocks * bs - 1)
            return tables.gather(1, capped // bs) * bs + capped % bs

        columns = torch.arange(width, device=self.device)
        is_pad = columns < pad_cols[:, None]  # [B, T]
        position_ids = torch.where(is_pad, 0, starts[:, None] + columns - pad_cols[:, None])
        write = torch.where(is_pad, 0, pool_index(position_ids))  # padding -> scratch
        keys = torch.arange(context, device=self.device).expand(len(rows), -1)  # [B, L]
        read = torch.where(keys < ends[:, None], pool_index(keys), 0)  # beyond -> scratch
        self.cache.prepare(write, read)
        mask = self._mask(position_ids, pad_cols, context)
        self.lora.batch = LoraBatch.for_rows([r.lora_slot for r in rows], width, self.slot_ranks)
        try:
            out = self.model(
                input_ids=input_ids,
                position_ids=position_ids,
                attention_mask=mask,
                cache=self.cache,
                use_cache=True,
                logits_to_keep=1,
            )
        finally:
            self.lora.batch = None
        return out.logits[:, -1, :].float()

    def _mask(
        self, position_ids: torch.Tensor, pad_cols: torch.Tensor, context: int
    ) -> torch.Tensor | dict[str, torch.Tensor]:
        """Additive masks [B, 1, T, L]: query at position p sees keys j <= p (within the window).

        Padding queries (the first pad_cols[b] columns) see every key: their outputs are
        discarded, and a fully masked row would produce NaNs in some attention kernels.
        """
        keys = torch.arange(context, device=self.device)  # [L]
        query_pos = position_ids.unsqueeze(-1)  # [B, T, 1]
        is_pad = (
            torch.arange(position_ids.shape[1], device=self.device) < pad_cols.unsqueeze(-1)
        ).unsqueeze(-1)  # [B, T, 1]
        causal = keys <= query_pos  # [B, T, L]

        def build(window: int | None) -> torch.Tensor:
            allowed = causal if window is None else causal & (query_pos - keys < window)
            allowed = allowed | is_pad
            mask = torch.zeros(allowed.shape, dtype=self.dtype, device=self.device)
            return mask.masked_fill_(~allowed, torch.finfo(self.dtype).min).unsqueeze(1)

        if isinstance(self.windows, dict):
            return {kind: build(window) for kind, window in self.windows.items()}
        return build(self.windows)
