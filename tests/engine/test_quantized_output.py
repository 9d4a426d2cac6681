"""`quantize_output`: the output projection in 4 bits or in 8. A mixed batch matches PEFT on a
base loaded the same way, token for token, with the engine's kernels computing the projection,
in fp32 and bf16 compute."""

from __future__ import annotations

import pytest
from tests.engine.helpers import make_core
from tests.engine.test_parity import check_staggered_pair_against_peft

from loraserve.model.kernels import native
from loraserve.model.linear import BaseLinear

ADAPTERS = ["r8-all", None, "r1-qv", "r16-mlp"]


@pytest.mark.parametrize("quantize_output", ["4bit", "int8"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_mixed_batch_with_a_quantized_output_projection_matches_peft(
    dtype, quantize_output, model_dirs, adapter_dirs
):
    core = make_core(model_dirs["llama"], "nf4", dtype, "cpu", quantize_output=quantize_output)
    head = core.runner.model.get_output_embeddings()
    assert isinstance(head, BaseLinear)
    in_kernel = head.packed is not None if quantize_output == "4bit" else head.int8 is not None
    assert in_kernel == (native() is not None)  # the kernels, not bitsandbytes' or torch's
    check_staggered_pair_against_peft(core, model_dirs["llama"], adapter_dirs["llama"], ADAPTERS,
                                      dtype, quantize_output=quantize_output)  # fmt: skip
