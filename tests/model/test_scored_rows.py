"""A row that asks for every token's logits (a decode token and its drafted tokens, checked in one
forward): each position's logits are those of feeding the same tokens one decode step at a
time, on every architecture (Gemma 2's sliding window included), beside one-token rows and a
prefill chunk in the same forward."""

from __future__ import annotations

import pytest
import torch
from tests.conftest import ARCHS
from tests.model.runner_steps import BLOCK_TOKENS, PROMPTS, SEQUENCE_TOKENS

from loraserve.model.kv_cache import PagedKVCache
from loraserve.model.loading import load_base_model
from loraserve.model.lora import LoraContext
from loraserve.model.runner import ModelRunner, RowInput

CHECKED = 4  # tokens the scored row feeds at once
TOLERANCE = 1e-4  # fp32: rows of other sizes in the kernels round differently


def _runner(model_dir) -> ModelRunner:
    model = load_base_model(str(model_dir), "nf4", "fp32", "cpu").model
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    per_seq = -(-SEQUENCE_TOKENS // BLOCK_TOKENS)
    cache = PagedKVCache(
        config.num_hidden_layers, 1 + len(PROMPTS) * per_seq, BLOCK_TOKENS,
        config.num_key_value_heads, head_dim, torch.float32, torch.device("cpu"),
    )  # fmt: skip
    return ModelRunner(model, cache, LoraContext(), [0])


@pytest.mark.parametrize("arch", ARCHS)
def test_every_scored_token_has_its_one_token_steps_logits(arch, model_dirs):
    tables = [list(range(1 + i * 6, 1 + (i + 1) * 6)) for i in range(len(PROMPTS))]
    gen = torch.Generator().manual_seed(1)
    seqs = [torch.randint(3, 500, (SEQUENCE_TOKENS,), generator=gen).tolist() for _ in PROMPTS]
    first, second, third = PROMPTS
    at = first + 5  # past Gemma 2's window of 8: each checked token's window starts later

    stepped = _runner(model_dirs[arch])
    stepped.forward([RowInput(s[:n], 0, t) for s, n, t in zip(seqs, PROMPTS, tables)])
    stepped.forward([RowInput(seqs[0][first:at], first, tables[0])])
    want = torch.cat([
        stepped.forward([RowInput(seqs[0][at + j : at + j + 1], at + j, tables[0])])
        for j in range(CHECKED)
    ])  # fmt: skip

    checked = _runner(model_dirs[arch])
    checked.forward([RowInput(s[:n], 0, t) for s, n, t in zip(seqs, PROMPTS, tables)])
    checked.forward([RowInput(seqs[0][first:at], first, tables[0])])
    got = checked.forward([
        RowInput(seqs[1][second : second + 1], second, tables[1]),  # a decode row
        RowInput(seqs[0][at : at + CHECKED], at, tables[0], scored=CHECKED),
        RowInput(seqs[2][third : third + 6], third, tables[2]),  # a prefill chunk
    ])  # fmt: skip
    assert got.shape == (1 + CHECKED + 1, want.shape[1])
    assert (got[1 : 1 + CHECKED] - want).abs().max().item() < TOLERANCE
