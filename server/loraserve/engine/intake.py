"""Request intake: from a `GenerateRequest` to a `Sequence` the scheduler may queue.

`Intake.make_sequence` validates the sampling parameters and the prompt against the served
model's limits (vocabulary, context, prompt bytes), tokenizes (chat messages through the model's
chat template), resolves the adapter to an
immutable key, compiles the constraint (through the constraint cache) and counts the request
against the queue's bounds; `leave_queue` uncounts it once admitted or retired. Any thread may
call it, but it blocks while a constraint compiles: the engine's thread only in tests.

Knows nothing about steps, batching or sampling.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Hashable

import torch
from transformers import PreTrainedTokenizerBase

from loraserve.adapters.manager import AdapterManager
from loraserve.config import EngineConfig
from loraserve.engine.constraint_cache import ConstraintCache
from loraserve.engine.sequence import EmitFn, Sequence
from loraserve.metrics import Metrics
from loraserve.model.blocks import BlockAllocator
from loraserve.model.chat import chat_prompt_ids
from loraserve.model.detokenizer import IncrementalDetokenizer
from loraserve.model.sampling import make_generator
from loraserve.types import (
    DEFAULT_TENANT,
    CapacityError,
    GenerateRequest,
    InvalidRequestError,
    SamplingParams,
)


class Intake:
    """vocab_size: the model's logits width; max_context: prompt + new tokens per request."""

    def __init__(
        self,
        config: EngineConfig,
        tokenizer: PreTrainedTokenizerBase,
        vocab_size: int,
        max_context: int,
        device: torch.device,
        metrics: Metrics,
        adapters: AdapterManager,
        allocator: BlockAllocator,
        constraints: ConstraintCache,
    ) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.max_context = max_context
        self.device = device
        self.metrics = metrics
        self.adapters = adapters
        self.allocator = allocator
        self.constraints = constraints
        self._ids = itertools.count(1)
        self._queued = 0  # sequences made and not yet admitted or retired
        self._queued_tokens = 0  # their prompt tokens
        self._queue_lock = threading.Lock()

    @property
    def queued(self) -> int:
        return self._queued

    def make_sequence(self, request: GenerateRequest, emit: EmitFn) -> Sequence:
        """Validate and tokenize `request`, resolve its adapter to an immutable key and compile
        its constraint.

        Raises InvalidRequestError, AdapterNotFoundError or CapacityError with a message that
        says what to change.
        """
        params = request.sampling
        params.validate()
        self._check_bias(params)
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
        grammar = self.constraints.get(params.constraint) if params.constraint else None
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
        tenant = request.tenant or DEFAULT_TENANT
        # never shared across tenants or adapters
        namespace = (tenant, adapter_key) if self.config.prefix_caching else None
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
            grammar=grammar.start() if grammar else None,
            prefix_namespace=namespace,
            prefix_chain=self._prefix_chain(namespace, prompt_ids),
            tenant=self.metrics.tenant_label(tenant),
            arrived_at=time.monotonic(),
        )

    def leave_queue(self, seq: Sequence) -> None:
        """Stop counting `seq` against the queue's bounds (once; it was admitted or retired)."""
        if seq.queued:
            seq.queued = False
            with self._queue_lock:
                self._queued -= 1
                self._queued_tokens -= seq.prompt_len

    def _prefix_chain(self, namespace: Hashable | None, prompt_ids: list[int]) -> list[bytes]:
        """The prefix-cache chain of the prompt's full blocks under `namespace` (none without
        one)."""
        if namespace is None:
            return []
        return self.allocator.prefix_chain(namespace, prompt_ids)

    def _check_bias(self, params: SamplingParams) -> None:
        outside = [b.token_id for b in params.logit_bias if b.token_id >= self.vocab_size]
        if outside:
            raise InvalidRequestError(
                f"logit_bias names token ids outside the vocabulary [0, {self.vocab_size}): "
                f"{outside[:5]}"
            )

    def _prompt_ids(self, request: GenerateRequest) -> list[int]:
        given = (request.prompt, request.prompt_token_ids, request.messages)
        if sum(p is not None for p in given) != 1:
            raise InvalidRequestError(
                "give exactly one of prompt (text), prompt_token_ids or chat messages"
            )
        if request.prompt is not None:
            self._check_prompt_bytes(request.prompt)
            ids = self.tokenizer.encode(request.prompt)
        elif request.messages is not None:
            self._check_prompt_bytes("".join(m.role + m.content for m in request.messages))
            ids = chat_prompt_ids(self.tokenizer, request.messages)
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
