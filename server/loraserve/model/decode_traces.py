"""Decode steps replayed from TorchScript traces on the CPU: the model's forward without its Python.

On a CPU the kernels take most of a decode step, but not all of it: the model's Python (module
calls, transformers' layer code, the wrappers that pick each op's kernel) runs between them, a
third of a one-row step of the benchmark's default model (benchmarks/RESULTS.md, "Beside
llama.cpp on a 1.1B model"). `torch.jit.trace` records the ops one forward runs; replaying the
record runs the same ops on new inputs in TorchScript's C++ interpreter, none of that Python
left: the same kernels, in the same order, on the same arguments, so the same bits.

A record replays the ops it saw whatever its inputs hold, so each belongs to one `TraceKey`: the
row counts that take the same paths through the projections' Python (`linear.rows_alike`: 1-3,
4, 5-32, 33-128, 129-256; the kernels choose among their own paths by the rows inside each
call, and the tracer records tensors' sizes as they flow, so one record replays every row count
of its range), whether any row is on an adapter (without, the layers skip the LoRA delta) and
whether the layers apply the slots' DoRA and bias terms (gathered over every row:
`LoraBatch.with_gathered_terms`, which the runner asks for where a row's slot holds one). Every
other choice a forward makes in Python must be the same on every step of a key, which holds for
the steps the runner hands here (`ModelRunner.forward`): decode rows only (one token each),
attended by the paged kernel (no architecture's eager attention), none on a slot that holds an
embedding delta (that applies per segment, in Python). A replay's
inputs are the tensors `ModelRunner.prepare` builds (tokens, positions, write slots, kept
tokens, the LoRA segments' columns, the block tables and context lengths, and with terms each
row's slot), so it reads its own step's rows; what it holds of the model (parameters, slot
buffers, pools, slot scales and terms) are the model's own tensors, which adapters and steps
update in place.

A key's record is made the first time a step needs it: recording runs that step's forward (its
logits are the step's) and takes about 0.15 s more than the step on the default benchmark model
(whose steps take 8-45 ms). The server makes the keys of every batch size it may run, on the
base and on adapters, before its first request (`ModelRunner.record_decode_steps`), so that no
request's step waits for one; steps on DoRA or bias terms still record on first use. A
recording that reads a value back from a tensor (which would bake that value in: TorchScript's
tracer warns of it) or fails is dropped, logged once, and that key's steps run eagerly from then
on, as do a key's steps after a replay that raised. (A Python branch on a tensor's value or
size shows only as a boolean read, which the wrappers' comparisons of sizes give too: the tests'
bit-for-bit comparisons with eager steps, at both ends of each key's range of rows, guard those
paths.) Records are never freed
(TorchScript keeps every traced function), so there are at most `max_records`; steps of other
keys run eagerly (logged once). A record holds no copy of a tensor, but TorchScript's graph and
interpreter take about 4 KB a node: 6.7 MB for the default model's 8 layers (1,592 nodes) once
repeated scalar constants are one and each node's source range is dropped (15.6 MB without: the
tracer keeps the whole Python stack, up to 4 KB, at every node); 908 once the size and list
bookkeeping is folded too (`_fold_bookkeeping`: the 8 records of 64 rows, each replayed once, hold
36.2 MB of the heap instead of 55.5).

`torch.jit.trace` is deprecated in torch 2.x, but it is the one way torch offers to replay an
eager forward's ops without Python that records in a fraction of a second; `torch.compile` would
recompile per row count and compiles for minutes on two cores.

Knows nothing about sequences, scheduling or adapter names: rows, slots and pool indices.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch

from loraserve.metrics import DecodeRecordStats
from loraserve.model.attention import AttentionBatch
from loraserve.model.forward import ForwardInputs
from loraserve.model.linear import rows_alike

log = logging.getLogger(__name__)

# The kinds of constant a record holds besides tensors; immutable, so equal ones can be one.
_SCALARS = ("IntType", "FloatType", "BoolType", "NoneType", "StringType", "DeviceObjType")

# What `_fold_bookkeeping` folds: the size and list bookkeeping the tracer records; the nodes
# that answer the same for the same inputs while nothing changes sizes or lists in place (the
# ops that would, none of which a forward runs, and none of which a trace records for lists).
_BOOKKEEPING = ("aten::size", "prim::NumToTensor", "aten::Int", "prim::ListConstruct")
_SAME_FOR_SAME_INPUTS = ("aten::size", "prim::ListConstruct")
_IN_PLACE_CHANGES = (
    "aten::resize_", "aten::resize_as_", "aten::set_",
    "aten::append", "aten::insert", "aten::_set_item", "aten::pop", "aten::clear",
    "aten::extend", "aten::remove", "aten::sort", "aten::reverse",
)  # fmt: skip

# TracerWarnings that mean a recording baked in a value of this step's tensors (a Python number,
# list or index read from one, or a tensor built from host values): its replays would reuse it.
# Python booleans are not among them: the wrappers compare tensors' sizes, which are the key's.
_VALUE_READS = (
    *(
        f"Converting a tensor to a Python {kind}"
        for kind in ("number", "float", "integer", "complex", "list", "index")
    ),
    "torch.tensor results are registered as constants",
)


@dataclass(frozen=True)
class TraceKey:
    """What one record serves: steps of any number of decode rows in `rows`
    (`linear.rows_alike`), on adapters or not, applying the slots' terms or not."""

    rows: range
    adapters: bool
    terms: bool = False

    @classmethod
    def of(cls, inputs: ForwardInputs) -> TraceKey:
        lora = inputs.lora
        return cls(rows_alike(inputs.input_ids.shape[1]), lora.any_adapter, lora.every_term)


def step_tensors(inputs: ForwardInputs) -> tuple[torch.Tensor, ...]:
    """Every tensor of a decode step's inputs that differs from step to step, in the order a
    record takes them."""
    decode = inputs.attention.decode
    if decode is None or inputs.attention.prefill:
        raise ValueError("a traced step holds decode rows only")
    slots = (inputs.lora.token_slots,) if inputs.lora.every_term else ()
    return (
        inputs.input_ids, inputs.positions, inputs.write_slots, inputs.kept_tokens,
        *inputs.lora.columns, decode.tokens, decode.block_tables, decode.context_lens, *slots,
    )  # fmt: skip


def with_tensors(template: ForwardInputs, tensors: tuple[torch.Tensor, ...]) -> ForwardInputs:
    """`template` (a step of the key being recorded) holding `tensors` (`step_tensors`' order)
    instead of its own: what the recorded forward reads."""
    ids, positions, writes, kept, starts, ends, seg_slots, ranks, tokens, tables, lens, *terms = (
        tensors
    )
    decode = template.attention.decode
    if decode is None:
        raise ValueError("a traced step holds decode rows only")
    rows = replace(decode, tokens=tokens, block_tables=tables, context_lens=lens)
    lora = replace(template.lora, columns=(starts, ends, seg_slots, ranks))
    if terms:  # each row's slot, for the terms applied over every row
        lora = replace(lora, slots=terms[0])
    return ForwardInputs(
        input_ids=ids,
        positions=positions,
        write_slots=writes,
        kept_tokens=kept,
        lora=lora,
        attention=AttentionBatch(
            template.attention.cache, rows, (), None, template.attention.every_chunk_in_kernel
        ),
    )


class DecodeTraces:
    """Decode forwards replayed from TorchScript records, one per `TraceKey`, made on first use,
    at most `max_records` of them.

    run: the runner's model call over one forward's inputs (returns logits [K, V] float32)."""

    def __init__(self, run: Callable[[ForwardInputs], torch.Tensor], max_records: int) -> None:
        self._run = run
        self.max_records = max_records
        self.traces: dict[TraceKey, Any] = {}  # a key -> its record (a TorchScript function)
        self.untraceable: set[TraceKey] = set()  # keys whose recording was dropped
        self._full = False  # whether a step found every record made and its key not among them
        self._replayed = self._recorded = self._eager = 0  # steps, by how they ran

    def stats(self) -> DecodeRecordStats:
        """The records held, and the decode steps handed to `forward` by how each ran: replayed
        from a record, recording one, or eagerly (no record serves it: its key past the most
        records, its recording dropped, or a step no record can serve)."""
        return DecodeRecordStats(len(self.traces), self._replayed, self._recorded, self._eager)

    def forward(self, inputs: ForwardInputs | None) -> torch.Tensor | None:
        """The logits [B, V] float32 of a decode step (see the module's docstring for which
        steps), its keys and values written to the pools; None where no record serves it (the
        caller runs the step eagerly), as for `inputs` None: a decode step that no record can
        serve, counted as eager."""
        logits = None if inputs is None else self._replay_or_record(inputs)
        if logits is None:
            self._eager += 1
        return logits

    def _replay_or_record(self, inputs: ForwardInputs) -> torch.Tensor | None:
        key = TraceKey.of(inputs)
        if key in self.untraceable:
            return None
        tensors = step_tensors(inputs)
        traced = self.traces.get(key)
        if traced is None:
            if len(self.traces) < self.max_records:
                return self._record(key, inputs, tensors)
            if not self._full:
                log.info("decode records: all %d made; steps of other keys run eagerly",
                         self.max_records)  # fmt: skip
                self._full = True
            return None
        try:
            with torch.jit.optimized_execution(False):  # the ops as recorded, no graph passes
                logits = traced(*tensors)
        except Exception as error:  # a record that cannot take this step's rows: a defect
            log.exception("replaying the decode record of %s failed; its steps run eagerly", key)
            del self.traces[key]
            self._drop(key, f"{type(error).__name__}: {error}")
            return None
        self._replayed += 1
        return logits

    def _record(
        self, key: TraceKey, inputs: ForwardInputs, tensors: tuple[torch.Tensor, ...]
    ) -> torch.Tensor | None:
        """Record `key`'s forward on this step and return the step's logits, which recording
        computes; None where the forward failed (the caller runs the step eagerly)."""
        logits: list[torch.Tensor] = []

        def forward(*step: torch.Tensor) -> torch.Tensor:
            logits.append(self._run(with_tensors(inputs, step)))
            return logits[-1]

        started = time.perf_counter()
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                traced = torch.jit.trace(forward, tensors, check_trace=False)
            _strip(traced.graph)
            _fold_bookkeeping(traced.graph)
        except Exception as error:  # an op or a Python type the tracer cannot take
            self._drop(key, f"{type(error).__name__}: {error}")
            return None
        reads = sorted({str(w.message).split(".")[0] for w in caught if _reads_a_value(w)})
        if reads:
            self._drop(key, "; ".join(reads))
            self._eager += 1  # the step's logits are its eager forward's, as it was traced
        else:
            self.traces[key] = traced
            self._recorded += 1
            log.info("recorded the CPU decode forward of %s in %.2f s (%d of at most %d)", key,
                     time.perf_counter() - started, len(self.traces), self.max_records)  # fmt: skip
        return logits[0]

    def _drop(self, key: TraceKey, why: str) -> None:
        if not self.untraceable:
            log.warning("some CPU decode steps run without a trace: recording %s failed (%s)",
                        key, why)  # fmt: skip
        self.untraceable.add(key)


def _strip(graph: torch._C.Graph) -> None:
    """What a record's replays do not need, out of its graph before its first replay: every
    node's source range (the whole Python stack at its op, as the tracer saw it), and repeated
    scalar constants (sizes, flags, dtypes: each equal one kept once; 2,538 -> 1,592 nodes on
    the default model). Tensor constants stay as they are, each the model's own tensor
    (TorchScript's constant pooling, which merges them by value, would make slot buffers that
    are still all zeros one tensor)."""
    first: dict[tuple[str, str], torch._C.Value] = {}
    for node in list(graph.nodes()):  # one block: a trace has no control flow
        if node.kind() != "prim::Constant":
            continue
        value = node.output()
        if value.type().kind() not in _SCALARS:
            continue
        key = (str(value.type()), repr(value.toIValue()))
        if key in first:  # the first of equal constants comes before any use of this one
            value.replaceAllUsesWith(first[key])
            node.destroy()
        else:
            first[key] = value
    bare = graph.create("prim::Constant", [], 1)  # a node with no metadata, never inserted
    for node in graph.nodes():
        node.copyMetadata(bare)


def _fold_bookkeeping(graph: torch._C.Graph) -> None:
    """The size and list bookkeeping the tracer records, folded before a record's first replay:
    a tensor's size along a dimension asked again, or a list built again of the same values, is
    the first answer (no op of the forward changes a size or a list in place: checked, else
    nothing is folded); `aten::Int` of `prim::NumToTensor` of an int is that int; what nothing
    uses then goes. On the default model's 8 layers 1,368 -> 684 nodes that are not constants
    (a one-row step 0.97x the time in fp32 and in bf16; the same bits). Runs after `_strip`,
    whose one constant per value lets equal inputs be told apart by their values' ids."""
    if any(node.kind() in _IN_PLACE_CHANGES for node in graph.nodes()):
        return
    first: dict[tuple[object, ...], torch._C.Value] = {}
    for node in list(graph.nodes()):
        kind = node.kind()
        if kind in _SAME_FOR_SAME_INPUTS:
            output = node.output()
            key = (kind, str(output.type()), *(value.unique() for value in node.inputs()))
            if key in first:
                output.replaceAllUsesWith(first[key])
                node.destroy()
            else:
                first[key] = output
        elif kind == "aten::Int":
            made = node.input().node()
            if made.kind() == "prim::NumToTensor" and made.input().type().kind() == "IntType":
                node.output().replaceAllUsesWith(made.input())
                node.destroy()
    for node in reversed(list(graph.nodes())):
        if node.kind() in _BOOKKEEPING and not node.output().uses():
            node.destroy()


def _reads_a_value(warning: warnings.WarningMessage) -> bool:
    return issubclass(warning.category, torch.jit.TracerWarning) and str(
        warning.message
    ).startswith(_VALUE_READS)
