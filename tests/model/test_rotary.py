"""The rotary embedding through the compiled kernel: the same bits as transformers' torch ops,
which modeling modules are swapped, and that a swapped model computes exactly what it did."""

from __future__ import annotations

import inspect
import sys
import types

import pytest
import torch
from tests.conftest import ARCHS
from transformers import AutoModelForCausalLM
from transformers.models.phi3 import modeling_phi3

from loraserve.model.kernels import native
from loraserve.model.rotary import (
    LLAMA_ROTARY,
    LLAMA_ROTATE_HALF,
    computes_llama_rotary,
    fuse_rotary,
    kernel_rotary,
    kernel_rotary_in_use,
)

pytestmark = pytest.mark.skipif(native() is None, reason="no compiled kernels for this CPU")


def _heads(batch, positions, heads, head_dim, seed):
    """[B, H, S, D] as attention modules make it: a transposed view of [B, S, H, D]."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, positions, heads, head_dim, generator=gen).transpose(1, 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16],
                         ids=["fp32", "bf16", "fp16"])  # fmt: skip
@pytest.mark.parametrize(
    ("batch", "angle_batch", "positions", "heads", "kv_heads", "head_dim"),
    [(1, 1, 32, 16, 16, 64), (1, 1, 1, 4, 2, 64), (2, 2, 5, 3, 1, 40), (2, 1, 7, 2, 2, 6),
     (1, 1, 3, 2, 1, 128)],
)  # fmt: skip
def test_the_kernel_gives_the_torch_ops_bits(batch, angle_batch, positions, heads, kv_heads,
                                              head_dim, dtype):  # fmt: skip
    """Head sizes with whole vectors, a vector and a tail, only a tail; grouped k heads; angles
    per sequence or shared by the batch; in fp32, and in 16 bits (each product and the sum
    rounded as torch's ops in that dtype round them)."""
    q = (_heads(batch, positions, heads, head_dim, seed=1) * 3).to(dtype)
    k = _heads(batch, positions, kv_heads, head_dim, seed=2).to(dtype)
    cos, sin = torch.randn(2, angle_batch, positions, head_dim).to(dtype).unbind(0)
    want_q, want_k = LLAMA_ROTARY(q, k, cos, sin)
    with kernel_rotary_in_use():
        got_q, got_k = kernel_rotary(_refused)(q, k, cos, sin)
    assert torch.equal(got_q, want_q) and torch.equal(got_k, want_k)
    assert got_q.stride() == q.stride() and got_k.stride() == k.stride()


def _refused(*args, **kwargs):
    raise AssertionError("the original ran where the kernel should have")


def test_what_the_kernel_does_not_take_goes_to_the_original():
    q = _heads(1, 4, 2, 16, seed=3).to(torch.float64)
    cos, sin = torch.randn(2, 1, 4, 16, dtype=torch.float64).unbind(0)
    rotary = kernel_rotary(LLAMA_ROTARY)
    with kernel_rotary_in_use():
        assert all(map(torch.equal, rotary(q, q, cos, sin), LLAMA_ROTARY(q, q, cos, sin)))
        mixed = rotary(q.float(), q.float(), cos.bfloat16(), sin.bfloat16())  # mixed dtypes
        assert all(map(torch.equal, mixed, LLAMA_ROTARY(q.float(), q.float(), cos.bfloat16(),
                                                         sin.bfloat16())))  # fmt: skip
        layout = q.float().transpose(1, 2)  # [B, S, H, D] with unsqueeze_dim=2
        angles = cos.float(), sin.float()
        got = rotary(layout, layout, *angles, unsqueeze_dim=2)
    assert all(map(torch.equal, got, LLAMA_ROTARY(layout, layout, *angles, unsqueeze_dim=2)))


def test_outside_the_runners_forwards_the_original_runs():
    """Another model in the process (a PEFT baseline, `generate`) gets transformers' own."""
    q = _heads(1, 4, 2, 16, seed=4)
    cos, sin = torch.randn(2, 1, 4, 16).unbind(0)
    with pytest.raises(AssertionError, match="the original ran"):
        kernel_rotary(_refused)(q, q, cos, sin)
    with kernel_rotary_in_use():
        kernel_rotary(_refused)(q, q, cos, sin)  # the kernel


def test_only_modules_with_llamas_code_are_recognised():
    assert not computes_llama_rotary(modeling_phi3)  # a partial rotary: other code
    assert not computes_llama_rotary(types.ModuleType("no_rotary"))


def test_fuse_rotary_swaps_a_modules_global_once(monkeypatch):
    module = types.ModuleType("modeling_copy")
    module.apply_rotary_pos_emb, module.rotate_half = LLAMA_ROTARY, LLAMA_ROTATE_HALF
    monkeypatch.setitem(sys.modules, module.__name__, module)
    layer = type("Attention", (torch.nn.Module,), {"__module__": module.__name__})()
    assert fuse_rotary(layer) == 1
    assert inspect.unwrap(module.apply_rotary_pos_emb) is LLAMA_ROTARY
    assert fuse_rotary(layer) == 0  # already swapped


def test_a_helper_made_a_hub_kernel_module_is_compared_and_swapped_by_its_function(monkeypatch):
    """transformers 5.25 with `kernels` turns apply_rotary_pos_emb into a module instance that
    calls it: the module's function is the one compared, and the one the swap wraps."""
    kernels = pytest.importorskip("kernels")
    module = types.ModuleType("modeling_hub_copy")
    wrapped = kernels.use_kernel_forward_from_hub("rotary_pos_emb")(LLAMA_ROTARY)
    assert not isinstance(wrapped, types.FunctionType)
    module.apply_rotary_pos_emb, module.rotate_half = wrapped, LLAMA_ROTATE_HALF
    monkeypatch.setitem(sys.modules, module.__name__, module)
    layer = type("Attention", (torch.nn.Module,), {"__module__": module.__name__})()
    assert computes_llama_rotary(module)
    assert fuse_rotary(layer) == 1
    assert inspect.unwrap(module.apply_rotary_pos_emb) is LLAMA_ROTARY


@pytest.mark.parametrize("arch", ARCHS)
def test_a_model_with_the_kernel_rotary_computes_exactly_what_it_did(arch, model_dirs, monkeypatch):
    model = AutoModelForCausalLM.from_pretrained(model_dirs[arch], dtype=torch.float32).eval()
    modeling = sys.modules[type(model).__module__]
    # an engine earlier in this process may have swapped it: start from transformers' own
    monkeypatch.setattr(
        modeling, "apply_rotary_pos_emb", inspect.unwrap(modeling.apply_rotary_pos_emb)
    )
    ids = torch.randint(
        0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1)
    )
    with torch.inference_mode():
        before = model(ids).logits
        assert fuse_rotary(model) == 1
        assert inspect.unwrap(modeling.apply_rotary_pos_emb) is not modeling.apply_rotary_pos_emb
        # every call of this forward must take the kernel: the original would raise
        monkeypatch.setattr(modeling, "apply_rotary_pos_emb", kernel_rotary(_refused))
        with kernel_rotary_in_use():
            after = model(ids).logits
    assert torch.equal(after, before)
