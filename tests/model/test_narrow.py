"""fp32 weights whose values are all bf16, held in bf16 (`model/narrow.py`).

What may be held so and what may not, and that every output keeps its bits: of the modules, and
of a runner's prefill and decode steps on a checkpoint stored in bf16. Skipped where this CPU
has no kernel build (the dense weights then run through their modules, in fp32).
"""

from __future__ import annotations

import pytest
import torch
from tests.model.runner_steps import prefill_and_decode
from torch import nn

from loraserve.model import runner as runner_module
from loraserve.model.kernels import native
from loraserve.model.linear import SMALL_BATCH_ROWS, wrap_projections
from loraserve.model.lora import LoraBatch, LoraContext
from loraserve.model.lora_embedding import MultiLoraEmbedding
from loraserve.model.narrow import narrow_exact_weights
from loraserve.model.runner import ModelRunner
from loraserve.model.tiny import write_tiny_model

pytestmark = pytest.mark.skipif(native() is None, reason="no compiled kernels for this CPU")


class ScaledEmbedding(nn.Embedding):
    """An embedding that computes on its weight's dtype (as Gemma's scaled one does)."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return super().forward(ids) * torch.tensor(3.3, dtype=self.weight.dtype)


def _model(values: torch.dtype, tied: bool = False, embedding: type = nn.Embedding) -> nn.Module:
    """An embedding, an output projection (tied to it or not) and a projection with a bias,
    their weights `values`' values held in fp32, each projection run by a BaseLinear."""
    torch.manual_seed(0)
    model = nn.Module()
    model.embed = embedding(50, 40)
    model.head = nn.Linear(40, 50, bias=False)
    model.proj = nn.Linear(40, 40)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(parameter.to(values).float())
    if tied:
        model.head.weight = model.embed.weight
    wrap_projections(model)
    return model


def _outputs(model: nn.Module, rows: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 40, generator=generator)
    ids = torch.randint(0, 50, (rows,), generator=generator)
    return [model.head(x), model.proj(x), model.embed(ids)]


@pytest.mark.parametrize("rows", [1, 30, 100, SMALL_BATCH_ROWS + 3])
def test_weights_of_bf16_values_are_held_in_bf16_and_every_output_keeps_its_bits(rows):
    model = _model(torch.bfloat16)
    before = _outputs(model, rows)
    assert narrow_exact_weights(model) == 2 * (2 * 50 * 40 + 40 * 40)  # half their fp32 bytes
    for weight in (model.head.module.weight, model.proj.module.weight, model.embed.weight):
        assert weight.dtype == torch.bfloat16
    assert model.proj.module.bias.dtype == torch.float32
    after = _outputs(model, rows)
    assert all(torch.equal(a, b) and a.dtype == torch.float32 for a, b in zip(after, before))
    assert narrow_exact_weights(model) == 0  # once


@pytest.mark.parametrize("rows", [1, 30, SMALL_BATCH_ROWS + 3])
def test_a_tied_output_projection_and_its_embedding_share_one_bf16_weight(rows):
    model = _model(torch.bfloat16, tied=True)
    before = _outputs(model, rows)
    assert narrow_exact_weights(model) == 2 * (50 * 40 + 40 * 40)
    assert model.head.module.weight is model.embed.weight
    assert model.embed.weight.dtype == torch.bfloat16
    after = _outputs(model, rows)
    assert all(torch.equal(a, b) and a.dtype == torch.float32 for a, b in zip(after, before))


def test_weights_with_values_bf16_lacks_stay_fp32():
    model = _model(torch.float32)
    assert narrow_exact_weights(model) == 0
    for weight in (model.head.module.weight, model.proj.module.weight, model.embed.weight):
        assert weight.dtype == torch.float32


def test_an_embedding_that_renormalizes_its_weight_stays_fp32():
    model = _model(torch.bfloat16)
    model.embed.max_norm = 1.0
    assert narrow_exact_weights(model) == 2 * (50 * 40 + 40 * 40)  # the projections only
    assert model.embed.weight.dtype == torch.float32


def test_an_embedding_lora_over_a_bf16_held_embedding_gives_the_same_bits():
    model = _model(torch.bfloat16)
    context = LoraContext()
    embedding = MultiLoraEmbedding(model.embed, context, 2, 4, torch.float32)
    generator = torch.Generator().manual_seed(1)
    embedding.set_slot(1, torch.randn(4, 50, generator=generator),
                       torch.randn(4, 40, generator=generator))  # fmt: skip
    ids = torch.randint(0, 50, (7,), generator=generator)
    context.batch = LoraBatch.for_rows([0, 1], [3, 4], [0, 4], torch.device("cpu"))
    before = embedding(ids)
    narrow_exact_weights(model)
    assert model.embed.weight.dtype == torch.bfloat16 and embedding.base is model.embed
    after = embedding(ids)
    assert after.dtype == torch.float32 and torch.equal(after, before)


def test_a_weight_tied_to_an_embedding_that_computes_on_it_stays_fp32():
    model = _model(torch.bfloat16, tied=True, embedding=ScaledEmbedding)
    before = _outputs(model, 5)
    assert narrow_exact_weights(model) == 2 * 40 * 40  # the projection's only
    assert model.head.module.weight is model.embed.weight
    assert model.embed.weight.dtype == torch.float32
    assert all(torch.equal(a, b) for a, b in zip(_outputs(model, 5), before))


@pytest.mark.parametrize(("quantization", "tied"), [("none", False), ("nf4", False), ("nf4", True)])
def test_a_bf16_checkpoint_in_fp32_compute_holds_its_dense_weights_in_bf16_same_logits(
    quantization, tied, tmp_path, monkeypatch
):
    """Its fp32 weights' values are all bf16, so the runner keeps them in bf16 (the output
    projection and the input embedding, tied or not; unquantized, every projection): the logits
    are those of the fp32 weights, bit for bit, through prefill and decode steps."""
    model_dir = write_tiny_model(
        tmp_path / "bf16", "llama", weights_dtype=torch.bfloat16, tie_word_embeddings=tied
    )

    def run() -> tuple[ModelRunner, list[torch.Tensor]]:
        return prefill_and_decode(model_dir, quantization)

    narrowed, got = run()
    head = narrowed.model.get_output_embeddings()
    assert head.module.weight.dtype == torch.bfloat16
    embedding = narrowed.model.get_input_embeddings()
    assert embedding.weight.dtype == torch.bfloat16
    assert (head.module.weight is embedding.weight) == tied
    projection = narrowed.model.model.layers[0].self_attn.q_proj
    assert (projection.module.weight.dtype == torch.bfloat16) == (quantization == "none")
    monkeypatch.setattr(runner_module, "narrow_exact_weights", lambda model: 0)
    kept, want = run()
    assert kept.model.get_output_embeddings().module.weight.dtype == torch.float32
    for step, (g, w) in enumerate(zip(got, want)):
        assert torch.equal(g, w), f"step {step}"
