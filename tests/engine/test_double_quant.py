"""QLoRA's double quantization: the base loads with its block scales double-quantized, holds
fewer bytes, and a mixed batch matches PEFT on the same double-quantized base."""

from __future__ import annotations

import pytest
from tests.engine.helpers import make_core
from tests.engine.test_parity import check_staggered_pair_against_peft

from loraserve.model.loading import load_base_model, quantized_bytes
from loraserve.model.tiny import write_tiny_model

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
    check_staggered_pair_against_peft(core, model_dirs["llama"], adapter_dirs["llama"], ADAPTERS,
                                      "fp32", double_quant=True)  # fmt: skip
