"""A runner on a model directory, stepped through one prefill and a few decode steps of three
sequences: the logits that two builds of the same model (bf16-held weights or not, huge pages or
not) must agree on, bit for bit."""

from __future__ import annotations

from pathlib import Path

import torch

from loraserve.model.kv_cache import PagedKVCache
from loraserve.model.loading import load_base_model
from loraserve.model.lora import LoraContext
from loraserve.model.runner import ModelRunner, RowInput

PROMPTS = (5, 9, 2)  # prompt tokens of each sequence
SEQUENCE_TOKENS = 24
BLOCK_TOKENS = 4


def prefill_and_decode(
    model_dir: Path,
    quantization: str,
    num_blocks: int = 0,
    decode_steps: int = 4,
    compute: str = "fp32",
    kv_dtype: torch.dtype | None = None,
) -> tuple[ModelRunner, list[torch.Tensor]]:
    """The runner (`compute` on the CPU, KV pools of at least `num_blocks` blocks, in `kv_dtype`
    or else the compute dtype) and its logits [3, vocab] of the prefill step and of each decode
    step."""
    loaded = load_base_model(str(model_dir), quantization, compute, "cpu")
    model = loaded.model
    config = model.config
    per_seq = -(-SEQUENCE_TOKENS // BLOCK_TOKENS)
    cache = PagedKVCache(
        config.num_hidden_layers, max(num_blocks, 1 + len(PROMPTS) * per_seq), BLOCK_TOKENS,
        config.num_key_value_heads, config.hidden_size // config.num_attention_heads,
        kv_dtype or loaded.compute_dtype, torch.device("cpu"),
    )  # fmt: skip
    runner = ModelRunner(model, cache, LoraContext(), [0])
    tables = [list(range(1 + i * per_seq, 1 + (i + 1) * per_seq)) for i in range(len(PROMPTS))]
    tokens = torch.Generator().manual_seed(0)
    seqs = [torch.randint(3, config.vocab_size, (SEQUENCE_TOKENS,), generator=tokens).tolist()
            for _ in PROMPTS]  # fmt: skip
    steps = [runner.forward([RowInput(s[:n], 0, t) for s, n, t in zip(seqs, PROMPTS, tables)])]
    for step in range(decode_steps):
        steps.append(runner.forward(
            [RowInput(s[n + step : n + step + 1], n + step, t)
             for s, n, t in zip(seqs, PROMPTS, tables)]
        ))  # fmt: skip
    return runner, steps
