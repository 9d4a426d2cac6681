"""Decode steps replayed from CUDA graphs: one launch for the hundreds a forward makes.

On a GPU a decode step is host-bound: the model's forward is hundreds of small kernels, and
launching each costs the host more than the GPU spends running it (benchmarks/RESULTS.md, the
H200 sections). A CUDA graph records the launches of one forward and replays them all at once
(`benchmarks/probe_decode_graph.py`: a 32-row step of the default model, 13.8 ms eager and
1.8 ms replayed, the same logits bit for bit).

A graph replays fixed shapes at fixed addresses, so each belongs to one `GraphShape`: the rows
padded up to a power of two, the context up to a power of two of blocks (at least
`MIN_CONTEXT_BLOCKS`), whether any row is on an adapter, and whether any row's slot holds a
DoRA or bias term in some layer (`TermedSlots`). Its inputs live in one static
buffer (`StaticDecode`) that the host refills with one copy before each replay. Padding rows
are token 0 at position 0 on the base, write their keys and values into the cache's scratch
block and attend to that slot alone; padded context positions are masked. Nothing the graph
computes may depend on host state that can change between replays: the LoRA batch takes the
gathered form over every row and applies every slot's terms, or none in a graph for slots
without terms (`LoraBatch.for_graph`: plain LoRA skips four launches a projection), and the
decode attention's gathered context is built inside the graph from the static block tables and
lengths (`AttentionBatch` with `use_kernel` off).

A shape's graph is captured the first time a step needs it (one eager forward to warm up, then
the capture), all graphs in one memory pool: steps run one at a time, so they never replay
concurrently. A model whose forward cannot be captured (one that reads values back to the host
mid-forward) is logged once and runs every step eagerly from then on.

Knows nothing about sequences, scheduling or adapter names: rows, slots and pool indices.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from loraserve.model.attention import AttentionBatch, DecodeRows
from loraserve.model.blocks import SCRATCH_BLOCK
from loraserve.model.forward import ForwardInputs, RowInput
from loraserve.model.kv_cache import PagedKVCache
from loraserve.model.lora import LoraBatch
from loraserve.model.slot_terms import TermedSlots

log = logging.getLogger(__name__)

MIN_CONTEXT_BLOCKS = 16  # a graph attends over at least this many blocks of context


@dataclass(frozen=True)
class GraphShape:
    """What one graph is captured for: `rows` rows (a power of two), contexts of up to
    `blocks` blocks (a power of two, at least MIN_CONTEXT_BLOCKS), whether any row may be on
    an adapter (without: no LoRA work is recorded), and whether any row's slot may hold a DoRA
    or bias term (without: no term is applied)."""

    rows: int
    blocks: int
    adapters: bool
    terms: bool = False

    @classmethod
    def of(cls, rows: list[RowInput], block_size: int, termed: TermedSlots) -> GraphShape:
        """The smallest shape that holds `rows` (decode rows: one token each), `termed` saying
        which slots hold terms now."""
        longest = max(row.start + 1 for row in rows)
        blocks = max(MIN_CONTEXT_BLOCKS, -(-longest // block_size))
        slots = [row.lora_slot for row in rows if row.lora_slot]
        return cls(
            _power_of_two_at_least(len(rows)),
            _power_of_two_at_least(blocks),
            bool(slots),
            termed.any_of(slots),
        )


def _power_of_two_at_least(n: int) -> int:
    return 1 << (n - 1).bit_length()


class StaticDecode:
    """A decode forward's inputs for one `GraphShape`, in one static int64 buffer on the device:
    each row's token, position, write slot, LoRA slot and context length, then its block table
    (R rows of W blocks) [5 R + R W]. `fill` writes a step's rows into it; `inputs` builds the
    forward's inputs as views of it (call it inside the capture: the int32 conversions it makes
    belong to the graph)."""

    def __init__(self, shape: GraphShape, cache: PagedKVCache, device: torch.device) -> None:
        self.shape = shape
        self.cache = cache
        rows, blocks = shape.rows, shape.blocks
        self.values = torch.zeros(5 * rows + rows * blocks, dtype=torch.int64, device=device)
        self.row_index = torch.arange(rows, device=device)  # [R]: packed token = row = kept logit

    def fill(self, rows: list[RowInput]) -> None:
        """Write `rows` (decode rows: one token each; at most `shape.rows`, contexts of at most
        `shape.blocks` blocks) and padding rows after them."""
        bs, width, pad = self.cache.block_size, self.shape.blocks, self.shape.rows - len(rows)
        scratch = SCRATCH_BLOCK * bs
        tables = [row.block_table[:width] + [SCRATCH_BLOCK] * (width - len(row.block_table))
                  for row in rows]  # fmt: skip
        host = torch.tensor(
            [row.tokens[0] for row in rows] + [0] * pad
            + [row.start for row in rows] + [0] * pad
            + [row.block_table[row.start // bs] * bs + row.start % bs for row in rows]
            + [scratch] * pad
            + [row.lora_slot for row in rows] + [0] * pad
            + [row.start + 1 for row in rows] + [1] * pad
            + [block for table in tables for block in table] + [SCRATCH_BLOCK] * (pad * width),
            dtype=torch.int64,
        )  # fmt: skip
        self.values.copy_(host)

    def inputs(self) -> ForwardInputs:
        """The forward's inputs over the buffer: input_ids, positions [1, R]; write slots [R];
        kept logits [R]; the LoRA batch; the attention batch (decode rows only)."""
        rows, blocks = self.shape.rows, self.shape.blocks
        ids, positions, writes, slots, lens = self.values[: 5 * rows].view(5, rows).unbind(0)
        tables = self.values[5 * rows :].view(rows, blocks)
        if self.shape.adapters:
            lora = LoraBatch.for_graph(slots, self.shape.terms)
        else:
            lora = LoraBatch.for_rows([0] * rows, [1] * rows, [0], self.values.device)
        decode = DecodeRows(
            tokens=self.row_index,
            block_tables=tables.to(torch.int32),
            context_lens=lens.to(torch.int32),
            longest=blocks * self.cache.block_size,
            use_kernel=False,
        )
        return ForwardInputs(
            input_ids=ids[None],
            positions=positions[None],
            write_slots=writes,
            kept_tokens=self.row_index,
            lora=lora,
            attention=AttentionBatch(self.cache, decode, ()),
        )


@dataclass(frozen=True)
class CapturedDecode:
    """One shape's graph, the buffer it reads and the logits [R, V] float32 it writes."""

    static: StaticDecode
    graph: torch.cuda.CUDAGraph
    logits: torch.Tensor


class DecodeGraphs:
    """Decode forwards replayed from CUDA graphs, captured per `GraphShape` on first use.

    run: the runner's model call over one forward's inputs; max_rows: the most rows a graph
    takes (steps with more run eagerly); termed: which slots hold terms (the model's
    `LoraContext.termed`)."""

    def __init__(
        self,
        run: Callable[[ForwardInputs], torch.Tensor],
        cache: PagedKVCache,
        max_rows: int,
        device: torch.device,
        termed: TermedSlots,
    ) -> None:
        self._run = run
        self.cache = cache
        self.termed = termed
        self.max_rows = max_rows
        self.device = device
        self.graphs: dict[GraphShape, CapturedDecode] = {}
        self.failed = False  # a capture failed: every step runs eagerly
        self._pool = torch.cuda.graph_pool_handle()

    def forward(self, rows: list[RowInput]) -> torch.Tensor | None:
        """The decode rows' (one token each) logits [B, V] float32 from a graph's replay, their
        keys and values written to the pools; None where no graph serves them (the caller runs
        the step eagerly)."""
        if self.failed or len(rows) > self.max_rows:
            return None
        shape = GraphShape.of(rows, self.cache.block_size, self.termed)
        captured = self.graphs.get(shape)
        if captured is None:
            captured = self._capture(shape, rows)
            if captured is None:
                return None
            self.graphs[shape] = captured
        else:
            captured.static.fill(rows)
        captured.graph.replay()
        return captured.logits[: len(rows)].clone()

    def _capture(self, shape: GraphShape, rows: list[RowInput]) -> CapturedDecode | None:
        static = StaticDecode(shape, self.cache, self.device)
        static.fill(rows)
        current = torch.cuda.current_stream(self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(current)
        with torch.cuda.stream(side):  # lazily built state (cuBLAS workspaces) before capture
            self._run(static.inputs())  # what fails here fails an eager step too: it propagates
        current.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            # thread_local: the adapter loader's copies on other threads go on during a capture
            with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
                logits = self._run(static.inputs())
        except Exception as error:  # the model reads values back to the host, or the like
            self.failed = True
            log.warning("decode steps run without CUDA graphs: capturing one failed (%s: %s)",
                        type(error).__name__, error)  # fmt: skip
            return None
        log.info("captured a decode graph for %s", shape)
        return CapturedDecode(static, graph, logits)
