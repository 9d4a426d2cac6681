"""Llama-style RMSNorms through the compiled kernel: which modules are swapped, and that a model
with its norms swapped computes what it computed before."""

from __future__ import annotations

import pytest
import torch
from tests.conftest import ARCHS
from torch import nn
from transformers import AutoModelForCausalLM
from transformers.models.gemma2.modeling_gemma2 import Gemma2RMSNorm
from transformers.models.llama.modeling_llama import LlamaRMSNorm
from transformers.models.mistral.modeling_mistral import MistralRMSNorm
from transformers.models.phi3.modeling_phi3 import Phi3RMSNorm
from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm
from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

from loraserve.model.kernels import native
from loraserve.model.norms import FusedRMSNorm, computes_llama_rms_norm, fuse_rms_norms

needs_kernels = pytest.mark.skipif(native() is None, reason="no compiled kernels for this CPU")


@pytest.mark.parametrize("norm", [LlamaRMSNorm, MistralRMSNorm, Qwen2RMSNorm, Qwen3RMSNorm,
                                  Phi3RMSNorm])  # fmt: skip
def test_norms_of_the_llama_family_are_recognised(norm):
    assert computes_llama_rms_norm(norm(64))


@pytest.mark.parametrize("module", [Gemma2RMSNorm(64), nn.LayerNorm(64), nn.Linear(64, 64)])
def test_norms_of_another_formula_are_not(module):
    """Gemma scales by 1 + weight: the same name and attributes, another forward."""
    assert not computes_llama_rms_norm(module)


@needs_kernels
def test_the_fused_norm_equals_the_module_and_falls_back_off_float32():
    torch.manual_seed(0)
    norm = LlamaRMSNorm(100, eps=1e-5)
    norm.weight.data = torch.randn(100)
    x = torch.randn(2, 3, 100) * 4
    torch.testing.assert_close(FusedRMSNorm(norm)(x), norm(x), rtol=2e-5, atol=2e-5)
    half = x.to(torch.bfloat16)
    assert torch.equal(FusedRMSNorm(norm)(half), norm(half))  # the module itself


@needs_kernels
@pytest.mark.parametrize("arch", ARCHS)
def test_a_model_with_fused_norms_computes_what_it_did(arch, model_dirs):
    model = AutoModelForCausalLM.from_pretrained(model_dirs[arch], dtype=torch.float32).eval()
    ids = torch.randint(
        0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1)
    )
    with torch.inference_mode():
        before = model(ids).logits
        fused = fuse_rms_norms(model)
        assert fuse_rms_norms(model) == 0  # already swapped: nothing wrapped twice
        after = model(ids).logits
    layers = model.config.num_hidden_layers
    assert fused == (0 if arch == "gemma2" else 2 * layers + 1)
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)
