"""The synchronous engine: requests in, one continuous-batching step at a time, events out.

`EngineCore` owns the model runner, the paged KV cache, the scheduler, the adapter manager, the
constraint cache and the request intake. `make_sequence` validates and tokenizes a request,
resolves its adapter to a key and compiles its constraint (see `intake`: any thread, but it
blocks while compiling); `add` / `cancel` / `step` are called from one thread only (the
`AsyncEngine` loop, or a test driving steps by hand). Each step: retire cancelled sequences,
admit waiting ones, run the prefill chunks and the decode tokens (while a helper thread fills
the constrained rows' next-token masks), sample, emit, retire finished sequences and free their
KV at once. With `speculative_tokens`, greedy decode rows feed drafted tokens too and keep
those greedy decoding would have chosen (`speculation`). `inbox` is how other threads reach
that thread: the adapter loader wakes it there.

Knows nothing about gRPC, asyncio or adapter storage: the adapter manager turns names into
keys and keys into slot grants.
"""

from __future__ import annotations

import logging
import time
from itertools import accumulate

import torch

from loraserve.adapters.manager import AdapterManager
from loraserve.adapters.store import AdapterStore
from loraserve.config import EngineConfig
from loraserve.engine.constraint_cache import ConstraintCache
from loraserve.engine.inbox import Inbox
from loraserve.engine.intake import Intake
from loraserve.engine.masks import MaskFiller, StepMasks
from loraserve.engine.scheduler import Scheduler
from loraserve.engine.sequence import EmitFn, Sequence
from loraserve.engine.speculation import Drafter, PromptLookup, Speculation
from loraserve.metrics import LiveState, Metrics, PrefixCacheStats
from loraserve.model.blocks import BlockAllocator
from loraserve.model.compute_team import DecodeThreads, ThreadGovernor, team_wait_seconds
from loraserve.model.detokenizer import token_text
from loraserve.model.grammar import GrammarCompiler
from loraserve.model.kv_cache import POOL_DTYPES, PagedKVCache
from loraserve.model.loading import LoadedModel
from loraserve.model.lora import LoraContext, wrap_lora_targets
from loraserve.model.runner import ModelRunner, RowInput
from loraserve.model.sampling import Sampled, sample_next_tokens
from loraserve.types import (
    FinalEvent,
    FinishReason,
    GenerateRequest,
    InvalidRequestError,
    LoraServeError,
    TokenEvent,
    TopLogprob,
)

log = logging.getLogger(__name__)

NON_FINITE = (
    "the model's scores for this request's next token are not finite (NaN or infinity): its "
    "adapter's weights, or its temperature or repetition_penalty, overflow; try another adapter "
    "version or milder sampling values"
)
BROKEN_GRAMMAR = "the constraint could not be followed past token {n}: {why}; simplify it"


def _eos_ids(loaded: LoadedModel) -> frozenset[int]:
    ids = {loaded.tokenizer.eos_token_id}
    configured = getattr(loaded.model.generation_config, "eos_token_id", None)
    ids.update(configured if isinstance(configured, list) else [configured])
    return frozenset(i for i in ids if i is not None)


def _adapter_names(seqs: list[Sequence]) -> tuple[str, ...]:
    """The gateway gauge's label: names from resolved keys only (see `AdapterKey.name`)."""
    return tuple(sorted({s.adapter_key.name for s in seqs if s.adapter_key is not None}))


class EngineCore:
    """store: where tenants' uploaded adapters live (None: only `adapters.load`ed ones);
    drafter: where drafts come from with `speculative_tokens` (default: `PromptLookup`)."""

    def __init__(
        self,
        loaded: LoadedModel,
        config: EngineConfig,
        metrics: Metrics | None = None,
        store: AdapterStore | None = None,
        drafter: Drafter | None = None,
    ) -> None:
        self.config = config
        self.metrics = metrics or Metrics()
        self.tokenizer = loaded.tokenizer
        self.device = loaded.device
        model_config = loaded.model.config.get_text_config()
        self.vocab_size = model_config.vocab_size
        self.lora = LoraContext()
        layers = wrap_lora_targets(
            loaded.model,
            self.lora,
            config.device_slots + 1,
            config.max_rank,
            loaded.compute_dtype,
            config.lora_target_modules,
            torch.bfloat16 if config.lora_slot_dtype == "bf16" else loaded.compute_dtype,
            narrow_slots=config.lora_slot_dtype == "auto",
        )
        self.inbox = Inbox()
        self.adapters = AdapterManager(
            layers,
            config.device_slots,
            config.max_rank,
            loaded.compute_dtype,
            loaded.device,
            config.host_cache_bytes,
            store=store,
            on_load_done=self.inbox.wake,
            metrics=self.metrics,
        )
        heads = model_config.num_attention_heads
        head_dim = getattr(model_config, "head_dim", None) or model_config.hidden_size // heads
        block = config.kv_block_size
        num_blocks = -(-config.kv_cache_tokens // block) + 1
        self.allocator = BlockAllocator(num_blocks, block)
        self.cache = PagedKVCache(
            model_config.num_hidden_layers,
            num_blocks,
            block,
            getattr(model_config, "num_key_value_heads", None) or heads,
            head_dim,
            POOL_DTYPES.get(config.kv_cache_dtype, loaded.compute_dtype),  # "compute": not one
            loaded.device,
        )
        per_token = self.cache.bytes_per_token()
        log.info("KV cache: %d tokens of %.1f KiB in %s, %.1f MiB", self.allocator.capacity_tokens,
                 per_token / 1024, self.kv_cache_dtype,
                 num_blocks * block * per_token / 2**20)  # fmt: skip
        self.runner = ModelRunner(
            loaded.model,
            self.cache,
            self.lora,
            self.adapters.slot_ranks,
            decode_graph_rows=config.max_batch_size if config.cuda_graphs else 0,
            batch_invariant=config.batch_invariant,
            decode_records=config.traced_decode_records,
        )
        self.speculation = (
            Speculation(
                drafter or PromptLookup(), config.speculative_tokens, config.speculative_max_rows
            )
            if config.speculative_tokens
            else None
        )
        if self.speculation is not None and self.device.type == "cuda" and config.cuda_graphs:
            log.warning("speculative_tokens on a GPU: a step with drafted tokens runs without its "
                        "CUDA graph, measured only on CPUs")  # fmt: skip
        self.scheduler = Scheduler(
            self.allocator,
            self.adapters,
            config.max_batch_size,
            config.max_step_tokens,
            config.slot_patience_steps,
            speculation=self.speculation,
            copy_kv=lambda copy: self.cache.copy_block(copy.source, copy.target, copy.tokens),
        )
        self.max_context = min(
            config.max_context,
            getattr(model_config, "max_position_embeddings", None) or config.max_context,
            self.allocator.capacity_tokens,
        )
        self.eos_ids = _eos_ids(loaded)
        self.grammars = GrammarCompiler(loaded.tokenizer, self.vocab_size, self.eos_ids)
        self.constraints = ConstraintCache(
            self.grammars.compile,
            max_constraint_bytes=config.max_constraint_bytes,
            max_entries=config.constraint_cache_entries,
            max_bytes=config.constraint_cache_bytes,
            timeout_s=config.constraint_compile_timeout_s,
            metrics=self.metrics,
        )
        self.masks = MaskFiller(self.grammars, config.max_batch_size, self.device)
        self.intake = Intake(
            config,
            self.tokenizer,
            self.vocab_size,
            self.max_context,
            self.device,
            self.metrics,
            self.adapters,
            self.allocator,
            self.constraints,
        )
        self.steps = 0
        self.updated_at = time.time()
        self._by_id: dict[int, Sequence] = {}
        # fewer threads for CPU decode steps while other processes hold the CPUs (compute_team)
        self.max_threads = torch.get_num_threads()
        adaptive = (
            config.adaptive_threads
            and self.device.type == "cpu"
            and self.max_threads > 1
            and team_wait_seconds() is not None
        )
        self.decode_threads = DecodeThreads(ThreadGovernor(self.max_threads)) if adaptive else None

    def record_decode_steps(self) -> int:
        """Before the first request, on the thread that steps: make the CPU decode records that
        steps of up to `max_batch_size` rows need, on the base and on adapters (the first
        adapter slot's rows, whatever it holds: `ModelRunner.record_decode_steps`), so that no
        request's step waits while one is recorded. No sequence, KV block or request metric is
        touched. Returns how many records were made (none where steps are not recorded)."""
        started = time.perf_counter()
        made = self.runner.record_decode_steps(self.config.max_batch_size, adapter_slot=1)
        if made:
            log.info("made %d decode records for up to %d rows in %.1f s", made,
                     self.config.max_batch_size, time.perf_counter() - started)  # fmt: skip
        return made

    # ---- requests -----------------------------------------------------------------------

    def make_sequence(self, request: GenerateRequest, emit: EmitFn) -> Sequence:
        """See `Intake.make_sequence`: blocks while the request's constraint compiles."""
        return self.intake.make_sequence(request, emit)

    def add(self, seq: Sequence) -> None:
        self.metrics.requests_received.labels(seq.tenant).inc()
        self._by_id[seq.request_id] = seq
        self.scheduler.add(seq)

    def add_request(self, request: GenerateRequest, emit: EmitFn) -> int:
        """make_sequence + add, for callers on the engine thread; returns the request id."""
        seq = self.make_sequence(request, emit)
        self.add(seq)
        return seq.request_id

    def cancel(self, request_id: int) -> None:
        """Mark for removal; the next step retires it and frees its KV."""
        seq = self._by_id.get(request_id)
        if seq is not None:
            seq.cancelled = True

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    # ---- the step -----------------------------------------------------------------------

    def step(self) -> bool:
        """One iteration: retire cancelled, admit, prefill + decode, sample, emit, retire.

        Returns False when nothing could run: every waiting request waits on an adapter load.
        """
        self.steps += 1
        self.updated_at = time.time()
        for seq in [s for s in self._by_id.values() if s.cancelled]:
            self._finish(seq, FinishReason.CANCELLED)
        admitted, failed = self.scheduler.admit()
        now = time.monotonic()
        for seq in admitted:
            self.intake.leave_queue(seq)
            self.metrics.queue_time.observe(now - seq.arrived_at)
        for seq, error in failed:
            self._fail(seq, error)
        plan = self.scheduler.plan()
        if not (plan.prefill or plan.decode):
            return False
        drafts = plan.drafts
        self.metrics.batch_size.observe(len(plan.prefill) + len(plan.decode))
        try:
            rows = [
                RowInput(s.token_ids[s.num_cached : s.num_cached + n], s.num_cached,
                         s.block_table, s.lora_slot, prompt=True)
                for s, n in plan.prefill
            ] + [
                RowInput(s.token_ids[s.num_cached :] + draft, s.num_cached, s.block_table,
                         s.lora_slot, 1 + len(draft))
                for s in plan.decode
                for draft in [drafts.get(s.request_id, [])]
            ]  # fmt: skip
            self.metrics.step_tokens.observe(sum(len(row.tokens) for row in rows))
            # The rows that sample this step: decodes, and prefills whose chunk ends the prompt.
            # Drafting rows come last, so the masks' row numbers hold in the logits as well.
            ready = [s for s, n in plan.prefill if s.num_cached + n >= s.prompt_len]
            ready += plan.decode
            pending = self.masks.start(ready)
            try:
                out = self._forward("prefill" if plan.prefill else "decode", rows)  # [K, V]
            finally:
                masks = pending.wait() if pending else None
            firsts = list(accumulate((row.scored for row in rows), initial=0))
            picked = []
            for i, (s, n) in enumerate(plan.prefill):
                s.num_cached += n
                self.allocator.publish(s.prefix_chain, s.block_table, s.token_ids, s.num_cached)
                if not s.in_prefill:
                    picked.append(firsts[i])
            for i, s in enumerate(plan.decode, start=len(plan.prefill)):
                s.num_cached = len(s.token_ids)
                self._publish_generated(s)
                picked.extend(range(firsts[i], firsts[i + 1]))
            if ready:  # picked ascends: as many as the rows means every row, in order
                logits = out if len(picked) == len(out) else out[picked]
                self._sample_and_emit(ready, logits, masks, drafts)
        except Exception as error:  # one bad step must not kill the engine
            stepped = [s for s, _ in plan.prefill] + list(plan.decode)
            log.exception("engine step failed; failing its %d sequences", len(stepped))
            for seq in stepped:
                if seq.request_id in self._by_id:  # not already retired
                    self._fail(seq, error)
        return True

    def _publish_generated(self, seq: Sequence) -> None:
        """Publish the blocks `seq`'s decode steps have filled, for a later prompt that holds
        this one's tokens and answer (a conversation's next turn). Not with batch_invariant: a
        decode row's KV has other bits than the same tokens' as a prompt's."""
        if seq.prefix_namespace is None or self.config.batch_invariant:
            return
        full = seq.num_cached // self.allocator.block_size
        if full >= len(seq.prefix_chain):
            seq.prefix_chain = self.allocator.prefix_chain(
                seq.prefix_namespace, seq.token_ids[: full * self.allocator.block_size],
                known=seq.prefix_chain,
            )  # fmt: skip
            self.allocator.publish(seq.prefix_chain, seq.block_table, seq.token_ids, seq.num_cached)

    def _publish_last_block(self, seq: Sequence) -> None:
        """Publish a finished sequence's partly filled last block to be copied from: a next
        turn, whose prompt holds this one's tokens, then computes only its new ones. Not with
        batch_invariant (a decode row's KV, as above)."""
        if seq.prefix_namespace is None or self.config.batch_invariant:
            return
        full, filled = divmod(seq.num_cached, self.allocator.block_size)
        if filled and full < len(seq.prefix_chain):
            computed = seq.token_ids[full * self.allocator.block_size : seq.num_cached]
            self.allocator.publish_partial(seq.prefix_chain[full], seq.block_table[full], computed)

    def _forward(self, phase: str, rows: list[RowInput]) -> torch.Tensor:
        started = time.perf_counter()
        if phase == "decode" and self.decode_threads is not None:
            logits = self.decode_threads.run(len(rows), lambda: self.runner.forward(rows))
        else:
            logits = self.runner.forward(rows)
        self.metrics.step_duration.labels(phase).observe(time.perf_counter() - started)
        return logits

    def _sample_and_emit(
        self,
        seqs: list[Sequence],
        logits: torch.Tensor,
        masks: StepMasks | None = None,
        drafts: dict[int, list[int]] | None = None,
    ) -> None:
        """logits: [K, V] float32, one row per sequence in `seqs` and one more per token drafted
        for it (`drafts`: request id -> draft; those sequences come last); masks: the
        constrained rows'.

        A drafting sequence's rows are its choices after its pending token and after each
        drafted token: it emits them in order while each choice is the drafted token that
        follows (whose keys and values this step wrote: it is cached now), and stops after
        the first that is not, or after the last row.

        A row that cannot be sampled, or whose emit raises, fails its own request alone:
        non-finite scores with InvalidRequestError (the adapter or the sampling values overflow,
        which retrying will not change), so does a constraint that broke (a step over its
        limits), anything unexpected as itself (INTERNAL, logged).
        """
        masks = masks or StepMasks()
        drafts = drafts or {}
        per_row = [s for s in seqs for _ in range(1 + len(drafts.get(s.request_id, ())))]
        histories = [
            s.history(self.device) if s.params.repetition_penalty != 1.0 else None for s in per_row
        ]
        sampled = sample_next_tokens(
            logits,
            [s.params for s in per_row],
            [s.generator for s in per_row],
            histories,
            masks.allowed,
        )
        tokens, logprobs = sampled.tokens.tolist(), sampled.logprobs.tolist()
        usable = sampled.usable.tolist()
        tops = self._top_logprobs(per_row, sampled)
        now = time.monotonic()

        def emitted(seq: Sequence, at: int) -> bool:
            """Emit row `at`'s choice for `seq`; False where the request failed on it instead."""
            error = sampled.errors.get(at)
            if at in masks.broken:
                why = masks.broken[at]
                error = InvalidRequestError(BROKEN_GRAMMAR.format(n=seq.num_generated, why=why))
            if error is None and not usable[at]:
                error = InvalidRequestError(NON_FINITE)
            if error is None:
                try:
                    self._emit_token(seq, tokens[at], logprobs[at], tops.get(at, ()), now)
                    return True
                except Exception as raised:  # this request fails alone
                    error = raised
            if not isinstance(error, LoraServeError):
                log.error("request %d failed while sampling", seq.request_id, exc_info=error)
            if seq.request_id in self._by_id:  # not already retired
                self._fail(seq, error)
            return False

        row = 0
        for seq in seqs:
            draft = drafts.get(seq.request_id, [])
            kept = 0
            for at in range(row, row + 1 + len(draft)):
                if not emitted(seq, at) or kept == len(draft) or tokens[at] != draft[kept]:
                    break
                kept += 1
                if seq.request_id not in self._by_id:  # it ended on the drafted token
                    break
                seq.num_cached += 1  # the drafted token's keys and values are the chosen one's
            row += 1 + len(draft)
            if draft and self.speculation is not None:
                self.speculation.checked(seq, kept)
                self.metrics.draft_tokens.labels("accepted").inc(kept)
                self.metrics.draft_tokens.labels("rejected").inc(len(draft) - kept)

    def _top_logprobs(
        self, seqs: list[Sequence], sampled: Sampled
    ) -> dict[int, tuple[TopLogprob, ...]]:
        """row -> its most likely tokens, as many as its request asked for."""
        if sampled.top is None:
            return {}
        ids, logprobs = sampled.top.ids.tolist(), sampled.top.logprobs.tolist()
        return {
            row: tuple(
                TopLogprob(i, lp, token_text(self.tokenizer, i))
                for i, lp in zip(ids[k], logprobs[k][: seqs[row].params.top_logprobs])
            )
            for k, row in enumerate(sampled.top.rows)
        }

    def _emit_token(
        self,
        seq: Sequence,
        token: int,
        logprob: float,
        top: tuple[TopLogprob, ...],
        now: float,
    ) -> None:
        """Append `token`, advance the request's grammar, emit the token and finish the request
        if it ends here: eos where allowed (always, where a grammar let it through), the grammar
        complete (EOS too: the output parses), a stop sequence, or max_new_tokens."""
        ends = token in self.eos_ids and (seq.grammar is not None or not seq.params.ignore_eos)
        if seq.grammar is not None and not ends and not seq.grammar.accept(token):
            why = seq.grammar.error or "the grammar refused the token"
            raise InvalidRequestError(BROKEN_GRAMMAR.format(n=seq.num_generated, why=why))
        seq.token_ids.append(token)
        since = seq.last_token_at if seq.num_generated > 1 else seq.arrived_at
        latency = self.metrics.inter_token_latency
        if seq.num_generated == 1:
            latency = self.metrics.time_to_first_token
        latency.observe(now - since)
        seq.last_token_at = now
        self.metrics.generated_tokens.labels(seq.tenant).inc()
        if ends:
            text, reason = seq.detokenizer.flush(), FinishReason.EOS
        else:
            text, stopped = seq.detokenizer.push(token)
            reason = FinishReason.STOP if stopped else None
            if reason is None and seq.grammar is not None and seq.grammar.done:
                text, reason = text + seq.detokenizer.flush(), FinishReason.EOS
            if reason is None and seq.num_generated >= seq.params.max_new_tokens:
                text, reason = text + seq.detokenizer.flush(), FinishReason.LENGTH
        logprob_or_none = logprob if seq.params.wants_logprobs else None
        seq.emit(TokenEvent(token, text, logprob_or_none, top))
        if reason is not None:
            self._finish(seq, reason)

    def _finish(self, seq: Sequence, reason: FinishReason) -> None:
        # Counted before the final event goes out: whoever has seen it can scrape its counts.
        self.metrics.requests_finished.labels(seq.tenant, reason.value).inc()
        self.metrics.prompt_tokens.labels(seq.tenant).inc(seq.prompt_len)
        self.metrics.request_duration.observe(time.monotonic() - seq.arrived_at)
        seq.emit(FinalEvent(reason, seq.prompt_len, seq.num_generated, seq.detokenizer.text))
        self._publish_last_block(seq)
        self._release(seq)

    def fail_all(self, error: Exception) -> None:
        """Send `error` to every queued and running request and retire them."""
        for seq in list(self._by_id.values()):
            self._fail(seq, error)

    def _fail(self, seq: Sequence, error: Exception) -> None:
        seq.emit(error)
        self.metrics.requests_finished.labels(seq.tenant, "error").inc()
        self._release(seq)

    def _release(self, seq: Sequence) -> None:
        self.intake.leave_queue(seq)
        self.scheduler.remove(seq)
        if seq.held_slot is not None:
            self.adapters.release(seq.held_slot)
        self._by_id.pop(seq.request_id, None)

    # ---- introspection ------------------------------------------------------------------

    def live_state(self) -> LiveState:
        """A snapshot for the scrape-time gauges; safe to call from any thread."""
        running, waiting = list(self.scheduler.running), list(self.scheduler.waiting)
        return LiveState(
            running=len(running),
            waiting=len(waiting),
            kv_usage_ratio=self.allocator.used_blocks / max(1, self.allocator.num_blocks - 1),
            adapters=self.adapters.stats(),
            running_adapters=_adapter_names(running),
            waiting_adapters=_adapter_names(waiting),
            prefix_cache=PrefixCacheStats(
                self.allocator.cached_blocks,
                self.allocator.counters.queried_blocks,
                self.allocator.counters.hit_blocks,
                self.allocator.counters.copied_tokens,
            ),
            compute_threads=(
                self.max_threads if self.decode_threads is None else self.decode_threads.threads
            ),
            team_wait_seconds=team_wait_seconds(),
            decode_records=self.runner.record_stats(),
            updated_at=self.updated_at,
        )

    @property
    def kv_cache_dtype(self) -> str:
        """What the KV pools hold keys and values in: fp32, bf16, fp16 or int8."""
        return self.cache.dtype_name

    @property
    def kv_used_tokens(self) -> int:
        return self.allocator.used_blocks * self.allocator.block_size

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)
