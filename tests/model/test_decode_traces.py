"""CPU decode steps replayed from TorchScript records (`model/decode_traces.py`).

The engine with `traced_decode_records` gives the tokens and logits, bit for bit, that it gives
without, across architectures and compute dtypes, on the base and on adapters that churn
through the slots after the records were made, on slots with DoRA and bias terms (replayed
gathered over every row) and beside embedding deltas (whose steps run eagerly); a replayed step
runs none of the model's Python; one record replays every row count that takes the same
paths through the projections as the one it was made at, bit for bit; a recording that reads a
value from a tensor, or fails, is dropped and its steps run eagerly, as are the steps of a record
whose replay raised; the records every batch size needs can be made before serving.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from tests.conftest import ARCHS
from tests.engine.helpers import PROMPTS, make_core, requests_on, run

from loraserve.metrics import DecodeRecordStats
from loraserve.model.decode_traces import DecodeTraces, TraceKey
from loraserve.model.linear import (
    PATH_CHANGES_AT,
    SMALL_BATCH_ROWS,
    amx_tiles,
    bf16_pairs,
    ranges_alike,
    rows_alike,
)
from loraserve.model.runner import RowInput
from loraserve.types import GenerateRequest, SamplingParams

FEW = range(1, PATH_CHANGES_AT[0])  # the row counts one record serves, from one row


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("arch", ARCHS)
def test_traced_steps_give_the_eager_engines_tokens_and_logits_bit_for_bit(
    arch, dtype, model_dirs, adapter_dirs, kind_adapter_dirs
):
    adapters = {**adapter_dirs[arch], **kind_adapter_dirs[arch]}
    results, recorded = {}, {}
    for traced in (False, True):
        # two slots: the adapters below take turns in them, after the first records were made
        core = make_core(
            model_dirs[arch], dtype=dtype, device_slots=2,
            traced_decode_records=32 if traced else 0,
        )  # fmt: skip
        got = run(core, {0: requests_on([None] * 3, 5), 2: requests_on([None] * 2, 3)})
        for name, directory in adapters.items():
            core.adapters.load(name, directory)
        for names in (["r8-all", None, "r1-qv"], ["r64-all", "r8-all", None, "r1-qv"],
                      ["dora-r8", None, "r8-all"], ["lora-bias-r4", "r8-all", "dora-bias-r8"],
                      ["embed-r4", "r64-all"]):  # fmt: skip
            got += run(core, {0: requests_on(names[:2], 6), 1: requests_on(names[2:], 4)})
        assert [r.error for r in got] == [None] * len(got)
        results[traced] = got
        recorded[traced] = core.runner.traces
    if arch == "gemma2":  # logit softcapping: its attention runs eagerly, no step is traced
        assert recorded[True] is None
    else:
        traces = recorded[True]
        assert traces is not None and not traces.untraceable
        kinds = {(key.adapters, key.terms) for key in traces.traces}
        assert kinds == {(False, False), (True, False), (True, True)}
        stats = traces.stats()  # the embedding delta's steps: eager
        assert stats.records == stats.recorded == len(traces.traces)
        assert stats.replayed > 0 and stats.eager > 0
    assert recorded[False] is None
    for eager, traced in zip(results[False], results[True], strict=True):
        assert traced.tokens == eager.tokens
        for ours, theirs in zip(traced.logits, eager.logits, strict=True):
            assert torch.equal(ours, theirs)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_records_made_before_serving_serve_every_batch_size_bit_for_bit(
    dtype, model_dirs, adapter_dirs
):
    """`EngineCore.record_decode_steps`, before any request, makes the records of every range
    of row counts up to max_batch_size, on the base and on adapters, taking no KV block and
    running no engine step: a batch shrinking from 40 rows to one, on two adapters and the
    base, then replays them, recording nothing, with the eager engine's tokens and logits."""
    most, results = 40, {}
    for records in (0, 16):
        core = make_core(model_dirs["llama"], dtype=dtype, device_slots=2, max_batch_size=most,
                         traced_decode_records=records)  # fmt: skip
        free = core.allocator.free_blocks
        made = core.record_decode_steps()
        assert core.allocator.free_blocks == free and not core.has_work() and core.steps == 0
        for name in ("r8-all", "r1-qv"):  # in slots before the requests: one prefill step
            core.adapters.prefetch(core.adapters.load(name, adapter_dirs["llama"][name]))
        assert core.adapters.wait_for_loads(timeout=60)
        requests = [
            GenerateRequest(
                prompt=PROMPTS[i % len(PROMPTS)], adapter=(None, "r8-all", "r1-qv")[i % 3],
                sampling=SamplingParams(max_new_tokens=2 + i, ignore_eos=True),
            )
            for i in range(most)
        ]  # fmt: skip
        results[records] = run(core, {0: requests})
        assert [len(r.tokens) for r in results[records]] == [2 + i for i in range(most)]
    assert made == 2 * len(ranges_alike(most))
    traces = core.runner.traces
    assert set(traces.traces) == {TraceKey(r, a) for r in ranges_alike(most) for a in (False, True)}
    stats = traces.stats()
    assert stats.recorded == made and stats.eager == 0
    assert stats.replayed == most  # each decode step of the shrinking batch, and none else
    for eager, traced in zip(results[0], results[16], strict=True):
        assert traced.tokens == eager.tokens
        for ours, theirs in zip(traced.logits, eager.logits, strict=True):
            assert torch.equal(ours, theirs)


def test_records_made_before_any_other_forward_in_bf16_are_kept(model_dirs):
    """Which bf16 paths this CPU takes is asked of the kernels by an op that answers a bool,
    which a recording cannot hold: the runner asks before any forward, so the first forward
    of the process, recorded, keeps its record."""
    amx_tiles.cache_clear()
    bf16_pairs.cache_clear()
    core = make_core(model_dirs["llama"], dtype="bf16", max_batch_size=4)
    assert core.record_decode_steps() == 2 * len(ranges_alike(4))
    assert not core.runner.traces.untraceable


def test_a_replayed_step_runs_none_of_the_models_python(model_dirs, monkeypatch):
    core = make_core(model_dirs["llama"])
    runner = core.runner
    rows = decode_rows(core, [5, 21])
    recorded = runner.forward(rows)  # records the steps of two decode rows
    assert set(runner.traces.traces) == {TraceKey(FEW, False)}

    def refuse(*args, **kwargs):
        raise AssertionError("the model's Python ran")

    monkeypatch.setattr(runner.model, "forward", refuse)
    monkeypatch.setattr(runner, "run", refuse)
    assert torch.equal(runner.forward(rows), recorded)  # the same step, replayed
    runner.forward(decode_rows(core, [5, 21, 8]))  # three rows: the same record
    more = PATH_CHANGES_AT[0]
    with pytest.raises(AssertionError, match="Python ran"):
        runner.forward(decode_rows(core, [5] * more))  # past FEW: not recorded yet


def test_rows_alike_are_the_row_counts_between_the_projections_path_changes():
    assert [rows_alike(n) for n in (1, 3, 4, 5, 32, 33, 128, 129, 256)] == [
        range(1, 4), range(1, 4), range(4, 5), range(5, 33), range(5, 33), range(33, 129),
        range(33, 129), range(129, 257), range(129, 257),
    ]  # fmt: skip
    assert rows_alike(SMALL_BATCH_ROWS + 1) == range(SMALL_BATCH_ROWS + 1, SMALL_BATCH_ROWS + 2)


# Each range of rows_alike up to 40 rows: the count its record is made at, then counts it
# replays (both ends of each range, and one past AMX_WIDENED_MAX_ROWS).
RECORD_THEN_REPLAY = ((2, [1, 3]), (4, []), (17, [5, 6, 31, 32]), (36, [33, 40]))


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("arch", [a for a in ARCHS if a != "gemma2"])  # gemma2: eager attention
def test_one_record_replays_every_row_count_of_its_range_bit_for_bit(
    arch, dtype, model_dirs, adapter_dirs
):
    """The projections choose their paths by the rows in Python, the kernels theirs inside each
    call: a record made at one row count, replayed at the others of its `rows_alike` range,
    gives the eager forward's logits at that count (rows on two adapters, and from three rows on
    the base too)."""
    core = make_core(model_dirs[arch], dtype=dtype, device_slots=2)
    for name in ("r8-all", "r1-qv"):
        core.adapters.prefetch(core.adapters.load(name, adapter_dirs[arch][name]))
    assert core.adapters.wait_for_loads(timeout=60)
    slots = [0, *(s for s, rank in enumerate(core.adapters.slot_ranks) if rank)]
    assert len(slots) == 3
    traces = DecodeTraces(core.runner.run, 8)

    def rows_of(count: int) -> list[RowInput]:
        rows = decode_rows(core, [3 + 7 * i % 29 for i in range(count)])
        return [replace(r, lora_slot=slots[(i + 1) % 3]) for i, r in enumerate(rows)]

    for recorded_at, replayed_at in RECORD_THEN_REPLAY:
        assert traces.forward(step_inputs(core, rows_of(recorded_at))) is not None
        for count in replayed_at:
            assert rows_alike(count) == rows_alike(recorded_at)
            replayed = traces.forward(step_inputs(core, rows_of(count)))
            assert torch.equal(replayed, core.runner.run(step_inputs(core, rows_of(count))))
    assert not traces.untraceable
    assert traces.stats() == DecodeRecordStats(
        records=len(RECORD_THEN_REPLAY), replayed=sum(len(r) for _, r in RECORD_THEN_REPLAY),
        recorded=len(RECORD_THEN_REPLAY), eager=0,
    )  # fmt: skip


def test_a_record_whose_replay_raises_is_dropped_and_its_key_runs_eagerly(model_dirs, caplog):
    core = make_core(model_dirs["llama"])
    runner = core.runner
    rows = decode_rows(core, [5, 21])
    runner.forward(rows)  # records FEW's steps

    def broken(*tensors):
        raise RuntimeError("the record cannot take these rows")

    runner.traces.traces[TraceKey(FEW, False)] = broken
    eager = runner.run(step_inputs(core, rows))
    assert torch.equal(runner.forward(rows), eager)  # the step, run eagerly instead
    assert runner.traces.untraceable == {TraceKey(FEW, False)} and not runner.traces.traces
    assert "replaying the decode record" in caplog.text
    runner.forward(decode_rows(core, [5, 21, 8]))  # FEW's steps: eager from now on
    assert runner.record_stats() == DecodeRecordStats(records=0, replayed=0, recorded=1, eager=2)


def step_inputs(core, rows: list[RowInput]):
    return core.runner.prepare(sorted(rows, key=lambda r: r.lora_slot))


def decode_rows(core, lengths: list[int]) -> list[RowInput]:
    """Rows of one token at these context lengths, on blocks of their own."""
    bs, rows, block = core.cache.block_size, [], 1
    for length in lengths:
        blocks = -(-length // bs)
        rows.append(RowInput([7], length - 1, list(range(block, block + blocks))))
        block += blocks
    return rows


def test_a_record_replays_other_contexts_as_the_eager_forward_computes_them(model_dirs):
    core = make_core(model_dirs["qwen2"])
    runner = core.runner
    traces = DecodeTraces(runner.run, 8)
    recorded = traces.forward(step_inputs(core, decode_rows(core, [5, 40])))
    assert recorded is not None and TraceKey(FEW, False) in traces.traces
    graph = traces.traces[TraceKey(FEW, False)].graph  # kept without the tracer's Python stacks
    assert not any(node.sourceRange() for node in graph.nodes())
    scalars = [
        (str(node.output().type()), repr(node.output().toIValue()))
        for node in graph.nodes()
        if node.kind() == "prim::Constant" and node.output().type().kind() != "TensorType"
    ]
    assert scalars and len(scalars) == len(set(scalars))  # each repeated scalar kept once
    for kind in ("aten::size", "prim::ListConstruct"):  # each size, each list, asked once
        asked = [
            (str(n.output().type()), *(value.unique() for value in n.inputs()))
            for n in graph.nodes()
            if n.kind() == kind
        ]
        assert asked and len(asked) == len(set(asked))
    assert not [
        n for n in graph.nodes()
        if n.kind() == "aten::Int" and n.input().node().kind() == "prim::NumToTensor"
    ]  # an int made a tensor and back is that int  # fmt: skip
    for lengths in ([5, 40], [70, 3], [129, 17]):  # longer block tables than recorded
        rows = decode_rows(core, lengths)
        replayed = traces.forward(step_inputs(core, rows))
        assert torch.equal(replayed, runner.run(step_inputs(core, rows)))


def test_a_recording_that_reads_a_value_is_dropped_and_its_key_runs_eagerly(model_dirs, caplog):
    core = make_core(model_dirs["llama"])
    runner = core.runner

    def reads_a_position(inputs):
        shift = float(inputs.positions.max())  # baked into a record: each step's own
        return runner.run(inputs) + shift * 0

    traces = DecodeTraces(reads_a_position, 8)
    inputs = step_inputs(core, decode_rows(core, [9]))
    logits = traces.forward(inputs)  # the recording's own forward: this step's logits
    assert torch.equal(logits, runner.run(step_inputs(core, decode_rows(core, [9]))))
    assert traces.untraceable == {TraceKey(FEW, False)} and not traces.traces
    assert "Converting a tensor to a Python float" in caplog.text
    assert traces.forward(inputs) is None  # dropped: the caller runs the step eagerly
    assert traces.stats() == DecodeRecordStats(records=0, replayed=0, recorded=0, eager=2)

    def fails(inputs):
        raise RuntimeError("no such op")

    failing = DecodeTraces(fails, 8)
    assert failing.forward(inputs) is None
    assert failing.untraceable == {TraceKey(FEW, False)}


def test_past_the_most_records_steps_of_other_keys_run_eagerly(model_dirs):
    core = make_core(model_dirs["llama"], traced_decode_records=1)
    runner = core.runner
    run(core, {0: requests_on([None, None], 3)})  # two rows: the one record
    assert set(runner.traces.traces) == {TraceKey(FEW, False)}
    assert runner.record_stats() == DecodeRecordStats(records=1, replayed=1, recorded=1, eager=0)
    more = PATH_CHANGES_AT[0]  # past FEW: another key
    results = run(core, {0: requests_on([None] * more, 3)})
    assert [len(r.tokens) for r in results] == [3] * more
    assert set(runner.traces.traces) == {TraceKey(FEW, False)} and not runner.traces.untraceable
    assert runner.record_stats() == DecodeRecordStats(records=1, replayed=1, recorded=1, eager=2)


def test_a_record_made_beside_empty_slot_buffers_replays_them_once_filled(model_dirs, adapter_dirs):
    """While the modules an adapter leaves alone keep their slot buffers at zero, those buffers
    are equal tensors: a record must keep each its own (TorchScript's constant pooling would
    merge them into one, and an adapter of more modules then loads into a buffer no layer
    reads)."""
    results = {}
    for records in (0, 16):
        core = make_core(model_dirs["qwen2"], device_slots=1, traced_decode_records=records)
        got = []
        for name in ("r1-qv", "r8-all", "r16-mlp"):  # q and v; all seven; the MLP's three
            core.adapters.load("solo", adapter_dirs["qwen2"][name])  # into the one slot
            got += run(core, {0: requests_on(["solo"], 5)})
        results[records] = got
    assert TraceKey(FEW, True) in core.runner.traces.traces
    for eager, traced in zip(results[0], results[16], strict=True):
        assert traced.tokens == eager.tokens
        for ours, theirs in zip(traced.logits, eager.logits, strict=True):
            assert torch.equal(ours, theirs)
