"""The synchronous engine: requests in, one continuous-batching step at a time, events out.

`EngineCore` owns the model runner, the paged KV cache, the scheduler and the adapter manager.
`make_sequence` validates and tokenizes a request and resolves its adapter to a key (any
thread); `add` / `cancel` / `step` are called from one thread only (the `AsyncEngine` loop, or a
test driving steps by hand). Each step: retire cancelled sequences, admit waiting ones, run the
prefill chunks and the decode tokens, sample, emit, retire finished sequences and free their KV
at once. `inbox` is how other threads reach that thread: the adapter loader wakes it there.

Knows nothing about gRPC, asyncio or adapter storage: the adapter manager turns names into
keys and keys into slot grants.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time

import torch

from loraserve.adapters.manager import AdapterManager
from loraserve.adapters.store import AdapterStore
from loraserve.config import EngineConfig
from loraserve.engine.inbox import Inbox
from loraserve.engine.scheduler import Scheduler
from loraserve.engine.sequence import EmitFn, Sequence
from loraserve.metrics import LiveState, Metrics
from loraserve.model.blocks import BlockAllocator
from loraserve.model.detokenizer import IncrementalDetokenizer
from loraserve.model.kv_cache import PagedKVCache
from loraserve.model.loading import LoadedModel
from loraserve.model.lora import LoraContext, wrap_lora_targets
from loraserve.model.runner import ModelRunner, RowInput
from loraserve.model.sampling import make_generator, sample_next_tokens
from loraserve.types import (
    DEFAULT_TENANT,
    CapacityError,
    FinalEvent,
    FinishReason,
    GenerateRequest,
    InvalidRequestError,
    LoraServeError,
    TokenEvent,
)

log = logging.getLogger(__name__)

NON_FINITE = (
    "the model's scores for this request's next token are not finite (NaN or infinity): its "
    "adapter's weights, or its temperature or repetition_penalty, overflow; try another adapter "
    "version or milder sampling values"
)


def _eos_ids(loaded: LoadedModel) -> frozenset[int]:
    ids = {loaded.tokenizer.eos_token_id}
    configured = getattr(loaded.model.generation_config, "eos_token_id", None)
    ids.update(configured if isinstance(configured, list) else [configured])
    return frozenset(i for i in ids if i is not None)


def _adapter_names(seqs: list[Sequence]) -> tuple[str, ...]:
    """The gateway gauge's label: names from resolved keys only (see `AdapterKey.name`)."""
    return tuple(sorted({s.adapter_key.name for s in seqs if s.adapter_key is not None}))


class EngineCore:
    """store: where tenants' uploaded adapters live (None: only `adapters.load`ed ones)."""

    def __init__(
        self,
        loaded: LoadedModel,
        config: EngineConfig,
        metrics: Metrics | None = None,
        store: AdapterStore | None = None,
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
            loaded.compute_dtype,
            loaded.device,
        )
        self.runner = ModelRunner(loaded.model, self.cache, self.lora, self.adapters.slot_ranks)
        self.scheduler = Scheduler(
            self.allocator,
            self.adapters,
            config.max_batch_size,
            config.max_step_tokens,
            config.slot_patience_steps,
        )
        self.max_context = min(
            config.max_context,
            getattr(model_config, "max_position_embeddings", None) or config.max_context,
            self.allocator.capacity_tokens,
        )
        self.eos_ids = _eos_ids(loaded)
        self.steps = 0
        self.updated_at = time.time()
        self._ids = itertools.count(1)
        self._queued = 0  # sequences made and not yet admitted or retired
        self._queued_tokens = 0  # their prompt tokens
        self._queue_lock = threading.Lock()
        self._by_id: dict[int, Sequence] = {}

    # ---- requests -----------------------------------------------------------------------

    def make_sequence(self, request: GenerateRequest, emit: EmitFn) -> Sequence:
        """Validate and tokenize `request`, and resolve its adapter to an immutable key.

        Raises InvalidRequestError, AdapterNotFoundError or CapacityError with a message that
        says what to change. Safe to call from any thread.
        """
        params = request.sampling
        params.validate()
        prompt_ids = self._prompt_ids(request)
        total = len(prompt_ids) + params.max_new_tokens
        if total > self.max_context:
            self.metrics.requests_rejected.labels("token_budget").inc()
            raise InvalidRequestError(
                f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({params.max_new_tokens}) = "
                f"{total} exceeds the context limit of {self.max_context} tokens; shorten the "
                "prompt or lower max_new_tokens"
            )
        adapter_key = self.adapters.resolve(
            request.adapter, request.tenant, request.adapter_version
        )
        with self._queue_lock:  # counts requests still in flight to the engine thread too
            if self._queued >= self.config.max_waiting:
                self.metrics.requests_rejected.labels("queue_full").inc()
                raise CapacityError(
                    f"the queue is full ({self.config.max_waiting} waiting requests); retry later"
                )
            if self._queued_tokens + len(prompt_ids) > self.config.max_waiting_tokens:
                self.metrics.requests_rejected.labels("queue_full").inc()
                raise CapacityError(
                    f"this request's {len(prompt_ids)} prompt tokens would take the queue to "
                    f"{self._queued_tokens + len(prompt_ids)}, above its bound of "
                    f"{self.config.max_waiting_tokens} prompt tokens; retry later"
                )
            self._queued += 1
            self._queued_tokens += len(prompt_ids)
        return Sequence(
            request_id=next(self._ids),
            prompt_len=len(prompt_ids),
            token_ids=list(prompt_ids),
            params=params,
            adapter_key=adapter_key,
            kv_tokens=total,
            detokenizer=IncrementalDetokenizer(self.tokenizer, prompt_ids, params.stop),
            generator=None if params.greedy else make_generator(params.seed, self.device),
            emit=emit,
            prefix_hashes=self._prefix_hashes(
                request.tenant or DEFAULT_TENANT, adapter_key, prompt_ids
            ),
            tenant=self.metrics.tenant_label(request.tenant or DEFAULT_TENANT),
            arrived_at=time.monotonic(),
        )

    def _prefix_hashes(self, tenant: str, adapter_key, prompt_ids: list[int]) -> list[bytes]:
        """The prefix-cache hashes of the prompt's full blocks, its last token aside (it must
        run to give the first logits). Namespaced by tenant and adapter: never shared across."""
        if not self.config.prefix_caching:
            return []
        return self.allocator.prefix_hashes((tenant, adapter_key), prompt_ids[:-1])

    def _prompt_ids(self, request: GenerateRequest) -> list[int]:
        if (request.prompt is None) == (request.prompt_token_ids is None):
            raise InvalidRequestError("give exactly one of prompt (text) or prompt_token_ids")
        if request.prompt is not None:
            self._check_prompt_bytes(request.prompt)
            ids = self.tokenizer.encode(request.prompt)
        else:
            ids = list(request.prompt_token_ids or ())
            bad = [t for t in ids if not (0 <= t < self.vocab_size)]
            if bad:
                raise InvalidRequestError(
                    f"prompt_token_ids holds ids outside the vocabulary [0, {self.vocab_size}): "
                    f"{bad[:5]}"
                )
        if not ids:
            raise InvalidRequestError("the prompt is empty; give at least one token")
        return ids

    def _check_prompt_bytes(self, prompt: str) -> None:
        """Refuse a prompt text over the byte limit before any tokenizer work."""
        limit = self.config.prompt_bytes_limit
        if len(prompt) > limit or len(prompt.encode("utf-8", "surrogatepass")) > limit:
            self.metrics.requests_rejected.labels("prompt_bytes").inc()
            size = len(prompt.encode("utf-8", "surrogatepass"))
            raise InvalidRequestError(
                f"the prompt is {size} bytes, above this server's limit of {limit} bytes "
                "(max_prompt_bytes); shorten the prompt"
            )

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
            self._leave_queue(seq)
            self.metrics.queue_time.observe(now - seq.arrived_at)
        for seq, error in failed:
            self._fail(seq, error)
        plan = self.scheduler.plan()
        if not (plan.prefill or plan.decode):
            return False
        self.metrics.batch_size.observe(len(plan.prefill) + len(plan.decode))
        self.metrics.step_tokens.observe(sum(n for _, n in plan.prefill) + len(plan.decode))
        try:
            rows = [
                RowInput(s.token_ids[s.num_cached : s.num_cached + n], s.num_cached,
                         s.block_table, s.lora_slot)
                for s, n in plan.prefill
            ] + [
                RowInput(s.token_ids[s.num_cached :], s.num_cached, s.block_table, s.lora_slot)
                for s in plan.decode
            ]  # fmt: skip
            out = self._forward("prefill" if plan.prefill else "decode", rows)  # [B, V]
            ready, logits = [], []
            for i, (s, n) in enumerate(plan.prefill):
                s.num_cached += n
                self.allocator.publish(s.prefix_hashes, s.block_table, s.num_cached)
                if not s.in_prefill:
                    ready.append(s)
                    logits.append(out[i])
            for i, s in enumerate(plan.decode, start=len(plan.prefill)):
                s.num_cached = len(s.token_ids)
                ready.append(s)
                logits.append(out[i])
            if ready:
                self._sample_and_emit(ready, torch.stack(logits))
        except Exception as error:  # one bad step must not kill the engine
            stepped = [s for s, _ in plan.prefill] + list(plan.decode)
            log.exception("engine step failed; failing its %d sequences", len(stepped))
            for seq in stepped:
                if seq.request_id in self._by_id:  # not already retired
                    self._fail(seq, error)
        return True

    def _forward(self, phase: str, rows: list[RowInput]) -> torch.Tensor:
        started = time.perf_counter()
        logits = self.runner.forward(rows)
        self.metrics.step_duration.labels(phase).observe(time.perf_counter() - started)
        return logits

    def _sample_and_emit(self, seqs: list[Sequence], logits: torch.Tensor) -> None:
        """logits: [N, V] float32, one row per sequence in `seqs`.

        A row that cannot be sampled, or whose emit raises, fails its own request alone:
        non-finite scores with InvalidRequestError (the adapter or the sampling values overflow,
        which retrying will not change), anything unexpected as itself (INTERNAL, logged).
        """
        histories = [
            s.history(self.device) if s.params.repetition_penalty != 1.0 else None for s in seqs
        ]
        sampled = sample_next_tokens(
            logits, [s.params for s in seqs], [s.generator for s in seqs], histories
        )
        tokens, logprobs = sampled.tokens.tolist(), sampled.logprobs.tolist()
        usable = sampled.usable.tolist()
        now = time.monotonic()
        for row, seq in enumerate(seqs):
            error = sampled.errors.get(row)
            if error is None and not usable[row]:
                error = InvalidRequestError(NON_FINITE)
            if error is None:
                try:
                    self._emit_token(seq, tokens[row], logprobs[row], now)
                    continue
                except Exception as raised:  # this request fails alone
                    error = raised
            if not isinstance(error, LoraServeError):
                log.error("request %d failed while sampling", seq.request_id, exc_info=error)
            if seq.request_id in self._by_id:  # not already retired
                self._fail(seq, error)

    def _emit_token(self, seq: Sequence, token: int, logprob: float, now: float) -> None:
        seq.token_ids.append(token)
        since = seq.last_token_at if seq.num_generated > 1 else seq.arrived_at
        latency = self.metrics.inter_token_latency
        if seq.num_generated == 1:
            latency = self.metrics.time_to_first_token
        latency.observe(now - since)
        seq.last_token_at = now
        self.metrics.generated_tokens.labels(seq.tenant).inc()
        if token in self.eos_ids and not seq.params.ignore_eos:
            text, reason = seq.detokenizer.flush(), FinishReason.EOS
        else:
            text, stopped = seq.detokenizer.push(token)
            reason = FinishReason.STOP if stopped else None
            if reason is None and seq.num_generated >= seq.params.max_new_tokens:
                text, reason = text + seq.detokenizer.flush(), FinishReason.LENGTH
        seq.emit(TokenEvent(token, text, logprob if seq.params.logprobs else None))
        if reason is not None:
            self._finish(seq, reason)

    def _finish(self, seq: Sequence, reason: FinishReason) -> None:
        seq.emit(FinalEvent(reason, seq.prompt_len, seq.num_generated, seq.detokenizer.text))
        self.metrics.requests_finished.labels(seq.tenant, reason.value).inc()
        self.metrics.prompt_tokens.labels(seq.tenant).inc(seq.prompt_len)
        self.metrics.request_duration.observe(time.monotonic() - seq.arrived_at)
        self._release(seq)

    def fail_all(self, error: Exception) -> None:
        """Send `error` to every queued and running request and retire them."""
        for seq in list(self._by_id.values()):
            self._fail(seq, error)

    def _fail(self, seq: Sequence, error: Exception) -> None:
        seq.emit(error)
        self.metrics.requests_finished.labels(seq.tenant, "error").inc()
        self._release(seq)

    def _leave_queue(self, seq: Sequence) -> None:
        if seq.queued:
            seq.queued = False
            with self._queue_lock:
                self._queued -= 1
                self._queued_tokens -= seq.prompt_len

    def _release(self, seq: Sequence) -> None:
        self._leave_queue(seq)
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
            prefix_cache=(
                self.allocator.cached_blocks,
                self.allocator.counters.queried_blocks,
                self.allocator.counters.hit_blocks,
            ),
            updated_at=self.updated_at,
        )

    @property
    def kv_used_tokens(self) -> int:
        return self.allocator.used_blocks * self.allocator.block_size

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)
