"""An architecture whose attention the paged kernels do not compute (Gemma2: logit softcapping,
a sliding window): the loader picks an attention it supports, and the engine attends its
layers with the architecture's own eager attention over the paged cache, as transformers does.
"""

from __future__ import annotations

import logging

import torch
from tests.engine.helpers import make_core, run

from loraserve.model import attention
from loraserve.model.loading import load_base_model
from loraserve.types import GenerateRequest, SamplingParams

NEW_TOKENS = 6
PROMPTS = (
    "Continuous batching lets new requests join at step boundaries while others decode, and "
    "a server holds one quantized base model and many small adapters, chosen per request.",
    "The quick brown fox",
)


def test_the_loader_picks_an_attention_each_architecture_supports(model_dirs, caplog):
    with caplog.at_level(logging.INFO, logger="loraserve.model.loading"):
        llama = load_base_model(str(model_dirs["llama"]), "none", "fp32", "cpu")
        gemma = load_base_model(str(model_dirs["gemma2"]), "none", "fp32", "cpu")
    assert llama.model.config._attn_implementation == "sdpa"
    assert gemma.model.config._attn_implementation == "eager"  # no SDPA for softcapping
    assert "Gemma2Config: loading with eager attention" in caplog.text


def test_softcapped_attention_over_the_paged_cache_equals_transformers(
    model_dirs, monkeypatch, caplog
):
    """Prefill in chunks (rows that start mid-prompt), decode rows, and a sliding window shorter
    than the prompt, unquantized fp32: the same tokens, logits within 1e-4."""
    monkeypatch.setattr(attention, "_logged_kinds", set())
    core = make_core(model_dirs["gemma2"], "none", max_batch_size=4, max_step_tokens=8)
    sampling = SamplingParams(max_new_tokens=NEW_TOKENS)
    requests = [GenerateRequest(prompt=prompt, sampling=sampling) for prompt in PROMPTS]
    with caplog.at_level(logging.INFO, logger="loraserve.model.attention"):
        results = run(core, {0: requests})
    assert (
        "Gemma2Attention sliding-window layers: its architecture's eager attention (softcap)"
        in caplog.text
    )
    reference = load_base_model(str(model_dirs["gemma2"]), "none", "fp32", "cpu").model
    prompt_ids = [core.tokenizer.encode(prompt) for prompt in PROMPTS]
    assert len(prompt_ids[0]) > max(8, core.config.max_step_tokens)  # window and chunks matter
    for ids, got in zip(prompt_ids, results):
        out = reference.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
            pad_token_id=core.tokenizer.pad_token_id,
        )
        assert got.tokens == out.sequences[0, len(ids) :].tolist()
        for ours, theirs in zip(got.logits, out.logits):
            torch.testing.assert_close(ours, theirs[0].float(), rtol=1e-4, atol=1e-4)

    # The softcap changes these logits, so the comparison above can fail without it.
    for module in reference.modules():
        if hasattr(module, "attn_logit_softcapping"):
            module.attn_logit_softcapping = None
    with torch.no_grad():
        uncapped = reference(torch.tensor([prompt_ids[0]])).logits[0, -1]
    assert (uncapped - results[0].logits[0]).abs().max() > 1e-2
