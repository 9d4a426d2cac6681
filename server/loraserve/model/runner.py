"""One forward pass over a ragged batch of rows, through the unmodified transformers model.

Each row is one sequence's new tokens (a prefill chunk or one decode token), where its context
already lives in the paged KV cache, and which LoRA slot it uses. The rows' tokens are laid end
to end as one sequence of N tokens (batch size 1, no padding), ordered by LoRA slot so that each
adapter's tokens form one segment. The runner builds, once per forward and for every layer:
`position_ids`, the pool index each new token is written to, the `AttentionBatch` that tells the
paged attention (`model/attention.py`) which tokens belong to which row, the `LoraBatch`, and
the index of each row's last token, the only one whose logits are computed (or of its last
few, where a row checks drafted tokens).

Knows nothing about requests, sampling, scheduling or adapter names: rows carry slot numbers.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from itertools import accumulate

import torch
from torch.nn.attention import sdpa_kernel
from transformers import PreTrainedModel

from loraserve.metrics import DecodeRecordStats
from loraserve.model import huge_pages
from loraserve.model.attention import (
    IMPLEMENTATION,
    SDPA_BACKENDS,
    AttentionBatch,
    DecodeRows,
    PrefillRow,
    PrefillTables,
    attends_eagerly,
    paged_kernels_apply,
)
from loraserve.model.blocks import SCRATCH_BLOCK
from loraserve.model.decode_graphs import DecodeGraphs
from loraserve.model.decode_traces import DecodeTraces
from loraserve.model.forward import ForwardInputs, RowInput
from loraserve.model.kv_cache import PagedKVCache
from loraserve.model.linear import (
    BaseLinear,
    link_shared_inputs,
    make_batch_invariant,
    probe_bf16_paths,
    ranges_alike,
    wrap_projections,
)
from loraserve.model.lora import LoraBatch, LoraContext
from loraserve.model.lora_embedding import MultiLoraEmbedding
from loraserve.model.narrow import narrow_exact_weights
from loraserve.model.norms import fuse_rms_norms
from loraserve.model.rotary import fuse_rotary, kernel_rotary_in_use

log = logging.getLogger(__name__)


class ModelRunner:
    """Runs the model on a list of rows and returns the next-token logits of each row.

    Owns the model from here on: it switches the model's attention to the paged implementation
    and its output projection to `BaseLinear`. On the CPU it also swaps its Llama-style RMSNorms
    for `FusedRMSNorm` and its rotary embedding for the kernel's (`rotary`; in its forwards
    only), runs every projection through `BaseLinear` (those no adapter targets too), links the
    4-bit ones that read one input (`SharedInputGroup`), holds fp32 weights whose values are all
    bf16 in bf16 (`narrow`: a bf16 checkpoint's output projection and input embedding), moves
    its large unquantized weights onto huge pages (`huge_pages`, where the KV pools and LoRA
    slots are allocated), and sets the process's malloc to keep freed memory (`host_memory`):
    every forward frees what the next one allocates. Every forward runs with the SDPA backends
    of `attention.SDPA_BACKENDS`. On a GPU, with `decode_graph_rows`, steps of up to that many
    decode rows (one token each) replay CUDA graphs (`decode_graphs`); on a CPU, with
    `decode_records`, steps of decode rows replay up to that many TorchScript records of the
    forward (`decode_traces`). With `batch_invariant`
    (the CPU kernels only) every projection and LoRA delta takes the kernels' batch-invariant
    paths (`linear.make_batch_invariant`) and every prefill chunk the attention kernel: a row's
    logits get the same bits whatever rows share its forward and however its prompt was split
    into forwards.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        cache: PagedKVCache,
        lora: LoraContext,
        slot_ranks: list[int],
        decode_graph_rows: int = 0,
        batch_invariant: bool = False,
        decode_records: int = 0,
    ) -> None:
        self.model = model
        self.cache = cache
        self.lora = lora
        self.slot_ranks = slot_ranks  # slot -> rank of the adapter in it; shared, kept up to date
        self.device = next(model.parameters()).device
        self.paged_kernels = paged_kernels_apply(cache)
        if self.device.type == "cpu":
            fuse_rms_norms(model)  # a GPU's host time would only pay the wrapper's call
            fuse_rotary(model)
            wrap_projections(model)  # those no adapter targets, which LoRA left as they were
            probe_bf16_paths()  # before any forward: none asks while it is being recorded
            link_shared_inputs(model)
            narrowed = narrow_exact_weights(model)
            if narrowed:
                log.info("fp32 weights whose values are all bf16 now held in bf16: %.1f MiB "
                         "freed", narrowed / 2**20)  # fmt: skip
            if huge_pages.available():
                moved = huge_pages.adopt_parameters(model)
                log.info("on 2 MiB pages: each KV pool, LoRA slot buffer and unquantized weight "
                         "of 2 MiB or more (%.1f MiB of weights)", moved / 2**20)  # fmt: skip
        model.set_attn_implementation(IMPLEMENTATION)
        if model.config._attn_implementation != IMPLEMENTATION:
            raise ValueError(
                f"{type(model).__name__} does not run its attention through transformers' "
                "attention interface, so it cannot attend over the paged KV cache"
            )
        output = model.get_output_embeddings()
        if not isinstance(output, BaseLinear):
            model.set_output_embeddings(BaseLinear(output))
        self.batch_invariant = batch_invariant
        if batch_invariant:
            if not self.paged_kernels:
                raise ValueError(
                    "batch_invariant needs loraserve's CPU kernels to attend over the KV cache: "
                    "a CPU with AVX2, pools in fp32, bf16 or fp16"
                )
            if attends_eagerly(model):
                raise ValueError(
                    "batch_invariant: this model's attention (logit softcapping or attention "
                    "sinks) runs through its architecture's eager function, whose sums depend "
                    "on the batch; serve it without batch_invariant"
                )
            make_batch_invariant(model)
        self.graphs: DecodeGraphs | None = None
        if decode_graph_rows and self.device.type == "cuda":
            self.graphs = DecodeGraphs(self.run, cache, decode_graph_rows, self.device, lora.termed)
        self.traces: DecodeTraces | None = None
        cpu_kernels = self.device.type == "cpu" and self.paged_kernels
        if decode_records and cpu_kernels and not attends_eagerly(model):
            self.traces = DecodeTraces(self.run, decode_records)
        self._embeddings = [m for m in model.modules() if isinstance(m, MultiLoraEmbedding)]

    @torch.inference_mode()
    def forward(self, rows: list[RowInput]) -> torch.Tensor:
        """Append each row's tokens to its context; returns float32 logits [K, V] of each row's
        last `scored` tokens (K = their sum; one per row: [B, V]), rows in the order of `rows`."""
        order = sorted(range(len(rows)), key=lambda i: rows[i].lora_slot)
        ordered = [rows[i] for i in order]
        logits = None
        decoding = all(len(r.tokens) == 1 and not r.prompt for r in rows)
        if self.graphs is not None and decoding:
            logits = self.graphs.forward(ordered)
        if logits is None:
            inputs = self.prepare(ordered)
            if self.traces is not None and decoding:
                logits = self.traces.forward(self._recordable(inputs, ordered))
            if logits is None:
                logits = self.run(inputs)
        if order == list(range(len(rows))):  # already in slot order (as base-only batches are)
            return logits
        firsts = list(accumulate((r.scored for r in ordered), initial=0))  # per ordered row
        place = {row: at for at, row in enumerate(order)}
        kept = [firsts[place[i]] + k for i, r in enumerate(rows) for k in range(r.scored)]
        return logits[torch.tensor(kept, device=logits.device)]

    def _recordable(self, inputs: ForwardInputs, rows: list[RowInput]) -> ForwardInputs | None:
        """A decode step's inputs as a record of the forward takes them (`decode_traces`): with
        the slots' DoRA and bias terms gathered over every row where any row's slot holds one;
        None where a row's slot holds an embedding delta, which applies per segment, in
        Python."""
        slots = {r.lora_slot for r in rows if r.lora_slot}
        if any(embedding.holds_delta(slots) for embedding in self._embeddings):
            return None
        if self.lora.termed.any_of(slots):
            return replace(inputs, lora=inputs.lora.with_gathered_terms())
        return inputs

    def record_decode_steps(self, most_rows: int, adapter_slot: int) -> int:
        """Make now the decode records (`decode_traces`) that steps of up to `most_rows` decode
        rows will need, so that no served step waits while its forward is recorded (0.15-0.6 s
        on the benchmark's default model, every stream in the batch waiting): one forward of
        the fewest rows of each range of row counts one record serves (`linear.ranges_alike`),
        on the base and on `adapter_slot` (not the base's). A record holds the forward's ops,
        not the values they read: the slot's weights do not matter (at start-up it holds none;
        one with DoRA or bias terms would make the records of steps with terms instead). Each
        row is token 0 at position 0 writing its keys and values into the scratch block, which
        no sequence attends to. Returns how many records were made."""
        if self.traces is None:
            return 0
        before = self.traces.stats().records
        for slot in (0, adapter_slot):
            row = RowInput([0], 0, [SCRATCH_BLOCK], slot)
            for rows in ranges_alike(most_rows):
                self.forward([row] * rows.start)
        return self.traces.stats().records - before

    def record_stats(self) -> DecodeRecordStats | None:
        """The decode records held and how decode steps ran (`decode_traces`); None where
        steps are not recorded (a GPU, no compiled kernels, or `decode_records` 0)."""
        return None if self.traces is None else self.traces.stats()

    def prepare(self, rows: list[RowInput]) -> ForwardInputs:
        """Every tensor one forward over `rows` (in slot order) reads, built on the host."""
        device, bs = self.device, self.cache.block_size
        counts = [len(r.tokens) for r in rows]
        blocks = max(len(r.block_table) for r in rows)
        tables = torch.tensor(
            [r.block_table + [0] * (blocks - len(r.block_table)) for r in rows], device=device
        )  # [B, blocks] int64
        firsts = list(accumulate(counts, initial=0))[:-1]  # each row's first packed token
        tokens = sum(counts)
        count_t = torch.tensor(counts, device=device)  # [B]
        first_t = torch.tensor(firsts, device=device)  # [B]
        starts = torch.tensor([r.start for r in rows], device=device)  # [B]
        row_of = torch.repeat_interleave(
            torch.arange(len(rows), device=device), count_t, output_size=tokens
        )  # [N]
        positions = starts[row_of] + torch.arange(tokens, device=device) - first_t[row_of]
        return ForwardInputs(
            input_ids=torch.tensor([t for r in rows for t in r.tokens], device=device)[None],
            positions=positions[None],
            write_slots=tables[row_of, positions // bs] * bs + positions % bs,
            kept_tokens=torch.tensor(
                [
                    t
                    for r, f, n in zip(rows, firsts, counts)
                    for t in range(f + n - r.scored, f + n)
                ],
                device=device,
            ),
            lora=LoraBatch.for_rows([r.lora_slot for r in rows], counts, self.slot_ranks, device),
            attention=self._attention_batch(rows, tables, firsts),
        )

    @torch.inference_mode()
    def run(self, inputs: ForwardInputs) -> torch.Tensor:
        """The model over one forward's inputs: writes their keys and values into the pools;
        returns float32 logits [K, V] of the kept tokens. Apart from `prepare` so that
        a GPU can capture it in a graph (`decode_graphs`): a decode forward reads no value back
        to the host."""
        self.cache.prepare(inputs.write_slots)
        self.lora.batch = inputs.lora
        try:
            with sdpa_kernel(SDPA_BACKENDS), kernel_rotary_in_use():
                out = self.model(
                    input_ids=inputs.input_ids,
                    position_ids=inputs.positions,
                    cache=self.cache,
                    use_cache=True,
                    logits_to_keep=inputs.kept_tokens,
                    attention_batch=inputs.attention,
                )
        finally:
            self.lora.batch = None
        return out.logits[0].float()  # [K, V]

    def _attention_batch(
        self, rows: list[RowInput], tables: torch.Tensor, firsts: list[int]
    ) -> AttentionBatch:
        """Rows of one token as decode rows, and so each token of a row that scores every token
        (a decode token and its draft: a few tokens, each attending as its own decode step
        would, through the row's block table); prompt chunks and every other row as prefill
        rows."""
        decoding = [not r.prompt and len(r.tokens) in (1, r.scored) for r in rows]
        decode = [(b, j) for b, r in enumerate(rows) if decoding[b] for j in range(len(r.tokens))]
        chunks = [b for b in range(len(rows)) if not decoding[b]]
        prefill = tuple(
            PrefillRow(firsts[b], len(rows[b].tokens), rows[b].start, tables[b]) for b in chunks
        )
        prefill_tables = None
        if chunks and self.paged_kernels:
            prefill_tables = PrefillTables(
                firsts=torch.tensor([firsts[b] for b in chunks]),
                counts=torch.tensor([len(rows[b].tokens) for b in chunks]),
                starts=torch.tensor([rows[b].start for b in chunks]),
                block_tables=tables[chunks].to(torch.int32),
            )
        decode_rows = None
        if decode:
            index = torch.tensor([b for b, _ in decode], device=self.device)
            context_lens = [rows[b].start + j + 1 for b, j in decode]
            decode_rows = DecodeRows(
                tokens=torch.tensor([firsts[b] + j for b, j in decode], device=self.device),
                block_tables=tables[index].to(torch.int32),
                context_lens=torch.tensor(context_lens, dtype=torch.int32, device=self.device),
                longest=max(context_lens),
                use_kernel=self.paged_kernels,
            )
        return AttentionBatch(
            self.cache, decode_rows, prefill, prefill_tables, self.batch_invariant
        )
