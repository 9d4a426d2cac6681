"""QLoRA's double quantization: the base loads with its block scales double-quantized, holds
fewer bytes, and a mixed batch matches PEFT on the same double-quantized base."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from tests.engine.helpers import load_reference_base, make_core, run
from tests.engine.test_parity import LOGIT_TOLERANCE, MAX_NEW, PROMPTS, first_difference

from loraserve.model.loading import load_base_model, quantized_bytes
from loraserve.model.tiny import write_tiny_model
from loraserve.types import GenerateRequest, SamplingParams

ADAPTERS = ["r8-all", "r1-qv", None, "r16-mlp"]


def test_double_quantized_scales_take_fewer_bytes(tmp_path):
    # Wide enough for the saved scales to outweigh the second-level tables.
    model = str(write_tiny_model(tmp_path / "wide", hidden_size=512, intermediate_size=1024,
                                 num_layers=1, num_heads=8, num_kv_heads=8))  # fmt: skip
    plain = quantized_bytes(load_base_model(model, "nf4", "fp32", "cpu").model)
    double = load_base_model(model, "nf4", "fp32", "cpu", double_quant=True)
    nested = quantized_bytes(double.model)
    assert nested.bf16 == plain.bf16
    # fp32 scales (4 bytes per 64 weights) become uint8 ones plus a table per 256 blocks.
    assert nested.quantized < plain.quantized - 0.7 * 3 * plain.bf16 / 2 / 64
    assert all(m.weight.quant_state.nested for m in double.model.modules() if hasattr(m, "weight")
               and hasattr(m.weight, "quant_state"))  # fmt: skip


@pytest.mark.parametrize("quantization", ["int8", "none"])
def test_double_quantization_is_refused_where_it_does_not_apply(model_dirs, quantization):
    with pytest.raises(ValueError, match="applies to nf4 and fp4"):
        load_base_model(str(model_dirs["llama"]), quantization, "fp32", "cpu", double_quant=True)


def test_mixed_batch_on_a_double_quantized_base_matches_peft(model_dirs, adapter_dirs):
    core = make_core(model_dirs["llama"], "nf4", "fp32", "cpu", double_quant=True)
    for name in {a for a in ADAPTERS if a}:
        core.adapters.load(name, adapter_dirs["llama"][name])
    requests = [
        GenerateRequest(prompt=p, adapter=a, sampling=SamplingParams(max_new_tokens=MAX_NEW))
        for p, a in zip(PROMPTS, ADAPTERS)
    ]
    results = run(core, {0: requests[:2], 2: requests[2:]})
    tolerance = LOGIT_TOLERANCE["nf4", "fp32"]
    for request, got in zip(requests, results):
        loaded = load_reference_base(model_dirs["llama"], "nf4", "fp32", "cpu", double_quant=True)
        model = loaded.model
        if request.adapter is not None:
            model = PeftModel.from_pretrained(model, adapter_dirs["llama"][request.adapter])
        prompt_ids = core.tokenizer.encode(request.prompt)
        out = model.generate(
            torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids)),
            max_new_tokens=MAX_NEW, do_sample=False, pad_token_id=loaded.tokenizer.pad_token_id,
        )  # fmt: skip
        want = out[0, len(prompt_ids) :].tolist()
        with torch.no_grad():
            logits = model(out[:, :-1]).logits[0, len(prompt_ids) - 1 :].float()
        same = first_difference(got.tokens, want)
        for step in range(min(same + 1, len(got.logits), len(logits))):
            diff = (got.logits[step] - logits[step]).abs().max().item()
            assert diff <= tolerance, f"{request.adapter} step {step}: {diff}"
        if same < len(want):  # a numerical tie at most
            margin = (logits[same][want[same]] - logits[same][got.tokens[same]]).item()
            assert margin <= tolerance, f"{request.adapter} step {same}: margin {margin}"
