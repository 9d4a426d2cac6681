"""Decode steps from CUDA graphs (`model/decode_graphs.py`).

On every device: a graph's padded static inputs, run eagerly through the runner's model call,
give each decode step's logits as the runner's own forward does, in a mixed batch of plain
LoRA, DoRA, embedding LoRA, bias terms and the base (the graph's form: every layer gathered,
every term applied, padding rows on the scratch block) and in a batch of plain LoRA and the
base (no term applied), and write no pool position but the rows' own and the scratch
block's; a slot holds terms where its adapter has some. On CUDA: the engine with graphs gives
the tokens and logits it gives without them, with adapters loaded after the first graphs were
captured.
"""

from __future__ import annotations

import pytest
import torch
from tests.conftest import ARCHS, KIND_SPECS
from tests.engine.helpers import make_core, requests_on, run

from loraserve.model.blocks import SCRATCH_BLOCK
from loraserve.model.decode_graphs import MIN_CONTEXT_BLOCKS, GraphShape, StaticDecode
from loraserve.model.runner import RowInput
from loraserve.model.slot_terms import TermedSlots


def test_a_graph_shape_pads_rows_and_context_to_powers_of_two():
    def rows(starts, slots):
        return [RowInput([1], s, [], slot) for s, slot in zip(starts, slots)]

    termed = TermedSlots()
    termed.add(3)  # slot 3 holds a term in one layer (DoRA, say)
    assert GraphShape.of(rows([0], [0]), 16, termed) == GraphShape(1, MIN_CONTEXT_BLOCKS, False)
    assert GraphShape.of(rows([5, 300, 7], [0, 2, 0]), 16, termed) == GraphShape(4, 32, True)
    assert GraphShape.of(rows([5, 6], [2, 3]), 16, termed) == GraphShape(2, 16, True, True)
    at_bound = 16 * MIN_CONTEXT_BLOCKS - 1  # the new token is position 255: 256 positions
    assert GraphShape.of(rows([at_bound] * 8, [0] * 8), 16, termed).blocks == MIN_CONTEXT_BLOCKS
    assert GraphShape.of(rows([at_bound + 1] * 9, [0] * 9), 16, termed) == GraphShape(16, 32, False)
    assert GraphShape.of(rows([40], [1]), 3, termed).blocks == 16  # ceil(41 / 3) = 14 blocks
    termed.add(3)
    termed.remove(3)
    assert GraphShape.of(rows([5], [3]), 16, termed).terms  # a second layer's term is left
    termed.remove(3)
    assert not GraphShape.of(rows([5], [3]), 16, termed).terms


@pytest.mark.parametrize(
    ("adapters", "with_terms"),
    [(["embed-r4"], False), (["dora-r8"], True), (["lora-bias-r4"], True)],
)
def test_slots_hold_terms_where_their_adapters_have_some(
    adapters, with_terms, model_dirs, kind_adapter_dirs
):
    core = make_core(model_dirs["llama"], device_slots=2)
    for name in adapters:
        core.adapters.load(name, kind_adapter_dirs["llama"][name])
    run(core, {0: requests_on(adapters, 1)})
    assert core.lora.termed.any_of(range(1, 3)) == with_terms


@pytest.mark.parametrize("arch", ARCHS)
def test_padded_graph_inputs_give_the_runners_logits_and_touch_no_other_pool_slot(
    arch, model_dirs, adapter_dirs, kind_adapter_dirs, monkeypatch
):
    core = make_core(model_dirs[arch], max_step_tokens=64)
    adapters = {**kind_adapter_dirs[arch], "r8-all": adapter_dirs[arch]["r8-all"]}
    for name, directory in adapters.items():
        core.adapters.load(name, directory)
    runner, cache = core.runner, core.cache
    bs = cache.block_size
    forward = runner.forward
    checked = []

    def checking_forward(rows: list[RowInput]) -> torch.Tensor:
        if any(len(row.tokens) != 1 for row in rows):
            return forward(rows)
        shape = GraphShape.of(rows, bs, core.lora.termed)
        static = StaticDecode(shape, cache, runner.device)
        static.fill(rows)
        before = [pool.clone() for pool in cache.key_pools + cache.value_pools]
        graphed = runner.run(static.inputs())  # [R, V]
        written = {row.block_table[row.start // bs] * bs + row.start % bs for row in rows}
        written |= set(range(SCRATCH_BLOCK * bs, (SCRATCH_BLOCK + 1) * bs))
        for old, new in zip(before, cache.key_pools + cache.value_pools):
            changed = (old != new).flatten(1).any(1).nonzero().flatten().tolist()
            assert set(changed) <= written
        logits = forward(rows)
        assert graphed.shape[0] == shape.rows
        torch.testing.assert_close(graphed[: len(rows)], logits, rtol=1e-4, atol=1e-4)
        checked.append(shape)
        return logits

    monkeypatch.setattr(runner, "forward", checking_forward)
    names = [spec.name for spec in KIND_SPECS] + ["r8-all", None]
    results = run(core, {0: requests_on(names[:4], 6), 2: requests_on(names[4:], 5)})
    assert [r.error for r in results] == [None] * len(names)  # the engine fails a step that raises
    assert [len(r.tokens) for r in results] == [6] * 4 + [5] * 3
    assert {shape.adapters for shape in checked} == {True}
    assert {shape.terms for shape in checked} == {True}
    assert any(shape.rows > 4 for shape in checked)  # seven rows padded to eight
    # plain LoRA (on the embedding too) and the base: graphs without terms
    plain = ["embed-r4", "r8-all", None]
    results = run(core, {0: requests_on(plain, 4)})
    assert [len(r.tokens) for r in results] == [4] * 3
    assert {shape.terms for shape in checked[-3:]} == {False}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_graphs_on_cuda_give_the_eager_engines_tokens_and_logits(
    arch, model_dirs, adapter_dirs, kind_adapter_dirs
):
    results = {}
    for graphs in (False, True):
        core = make_core(model_dirs[arch], device="cuda", max_step_tokens=64, cuda_graphs=graphs)
        base_only = run(core, {0: requests_on([None] * 3, 4)})  # captures graphs first
        for name, directory in {**kind_adapter_dirs[arch], **adapter_dirs[arch]}.items():
            core.adapters.load(name, directory)
        names = ["dora-bias-r8", "r8-all", None, "embed-r4", "dora-r8", "r1-qv", "r64-all"]
        results[graphs] = base_only + run(core, {0: requests_on(names, 8)})
        assert [r.error for r in results[graphs]] == [None] * 10
        assert (core.runner.graphs is not None and bool(core.runner.graphs.graphs)) == graphs
        assert core.runner.graphs is None or not core.runner.graphs.failed
    for eager, graphed in zip(results[False], results[True], strict=True):
        assert graphed.tokens == eager.tokens
        for ours, theirs in zip(graphed.logits, eager.logits, strict=True):
            torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
