"""What one forward of the model runner takes: the rows of a step, and the tensors built from them.

Knows nothing about requests, scheduling or adapter names: rows carry tokens, positions, block
tables and slot numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from loraserve.model.attention import AttentionBatch
from loraserve.model.lora import LoraBatch


@dataclass(frozen=True)
class RowInput:
    """One sequence in one forward: `tokens` to append after `start` cached positions, the
    last `scored` of them getting next-token logits (more than one where a row checks drafted
    tokens: each one's logits say what should follow it). `prompt`: a chunk of the prompt,
    attended as a prefill row even when it is one token long (as a prompt's tokens always are,
    so that their keys and values do not depend on how the prompt was split into chunks); other
    rows of one token, or of only scored tokens, attend as decode steps."""

    tokens: list[int]
    start: int
    block_table: list[int]
    lora_slot: int = 0
    scored: int = 1
    prompt: bool = False


@dataclass(frozen=True)
class ForwardInputs:
    """Every tensor one forward reads, for rows laid end to end in slot order (N tokens, B rows):
    input_ids, positions [1, N] int64; write_slots [N] int64, the pool index each new token's
    keys and values go to; kept_tokens [K] int64, the packed tokens whose logits are kept (each
    row's last `scored`, in row order); the LoRA and attention batches."""

    input_ids: torch.Tensor
    positions: torch.Tensor
    write_slots: torch.Tensor
    kept_tokens: torch.Tensor
    lora: LoraBatch
    attention: AttentionBatch
