"""The compiled-constraint cache: each distinct constraint compiles once, on a small pool of its
own and under a deadline; the cache keeps the least recently used out past its bounds.

`get(constraint)` blocks its caller (a request's worker thread: never the event loop, never
the engine thread) until the grammar is ready. It raises InvalidRequestError at once for a
constraint over the size limit, and for one that does not compile or outlives the deadline;
CapacityError when the pool has more compiles pending than it can start in time. Concurrent
requests for one constraint share one compile. A refusal is cached like a grammar, so a hostile
constraint sent again is refused without compiling it again; a compile that outlived its
deadline goes on running to its end (its steps are bounded by the grammar compiler's limits),
and the refusal stays.

Bounds: `max_entries` entries and `max_bytes` bytes of compiled grammars (each one's estimate,
see `Grammar.size_bytes`) and refusals; an entry larger than `max_bytes` is used, not kept.

Knows nothing about requests or batching; compiling is the grammar compiler's.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass

from loraserve.metrics import Metrics
from loraserve.model.cpus import serial_executor
from loraserve.model.grammar import Grammar
from loraserve.types import CapacityError, Constraint, ConstraintKind, InvalidRequestError

COMPILE_WORKERS = 2
PENDING_PER_WORKER = 4


@dataclass(frozen=True)
class ConstraintKey:
    kind: ConstraintKind
    text: str
    choices: tuple[str, ...]

    @classmethod
    def of(cls, constraint: Constraint) -> ConstraintKey:
        return cls(constraint.kind, constraint.text, constraint.choices)

    @property
    def size_bytes(self) -> int:
        """The constraint's size as the limit counts it: its UTF-8 bytes."""
        return len(self.text.encode("utf-8", "surrogatepass")) + sum(
            len(c.encode("utf-8", "surrogatepass")) for c in self.choices
        )


@dataclass(frozen=True)
class CacheStats:
    entries: int
    bytes: int
    compiles: int  # started (a shared compile counts once)
    evictions: int


class ConstraintCache:
    def __init__(
        self,
        compile_fn: Callable[[Constraint], Grammar],
        *,
        max_constraint_bytes: int,
        max_entries: int,
        max_bytes: int,
        timeout_s: float,
        metrics: Metrics,
        workers: int = COMPILE_WORKERS,
    ) -> None:
        self._compile_fn = compile_fn
        self.max_constraint_bytes = max_constraint_bytes
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s
        self._metrics = metrics
        self._max_pending = workers * PENDING_PER_WORKER
        self._pool = serial_executor(workers, "loraserve-grammar")
        self._lock = threading.Lock()
        # key -> the grammar, or the message it was refused with; least recently used first
        self._entries: OrderedDict[ConstraintKey, Grammar | str] = OrderedDict()
        self._bytes = 0
        self._compiling: dict[ConstraintKey, Future[Grammar]] = {}
        self._compiles = 0
        self._evictions = 0

    def get(self, constraint: Constraint) -> Grammar:
        """The compiled grammar of `constraint` (blocks; see the module docstring)."""
        key = ConstraintKey.of(constraint)
        if key.size_bytes > self.max_constraint_bytes:
            self._refused()
            raise InvalidRequestError(
                f"the {key.kind.value} constraint is {key.size_bytes} bytes, above this server's "
                f"limit of {self.max_constraint_bytes} (max_constraint_bytes); shorten it"
            )
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                future = self._compiling.get(key) or self._submit(key, constraint)
            else:
                self._entries.move_to_end(key)
        if entry is None:
            return self._wait(key, future)
        if isinstance(entry, str):
            self._refused()
            raise InvalidRequestError(entry)
        self._metrics.constraint_lookups.labels("hit").inc()
        return entry

    def _submit(self, key: ConstraintKey, constraint: Constraint) -> Future[Grammar]:
        if len(self._compiling) >= self._max_pending:
            raise CapacityError(
                f"{len(self._compiling)} constraints are compiling already; retry later"
            )
        future = self._pool.submit(self._compile, key, constraint)
        self._compiling[key] = future
        self._compiles += 1
        return future

    def _wait(self, key: ConstraintKey, future: Future[Grammar]) -> Grammar:
        try:
            grammar = future.result(timeout=self.timeout_s)
        except FutureTimeout:
            if future.cancel():  # it never started: the pool was busy, not this constraint
                with self._lock:
                    self._compiling.pop(key, None)
                raise CapacityError("the constraint compiler is busy; retry later") from None
            message = (
                f"the {key.kind.value} constraint did not compile within {self.timeout_s:g} s "
                "(constraint_compile_timeout_s); simplify it"
            )
            with self._lock:
                self._keep(key, message)
            self._refused()
            raise InvalidRequestError(message) from None
        except InvalidRequestError:
            self._refused()
            raise
        self._metrics.constraint_lookups.labels("compiled").inc()
        return grammar

    def _compile(self, key: ConstraintKey, constraint: Constraint) -> Grammar:
        """On a pool thread: compile, and cache the grammar or the refusal (unless a deadline's
        refusal got there first)."""
        started = time.perf_counter()
        try:
            entry: Grammar | str = self._compile_fn(constraint)
        except InvalidRequestError as error:
            entry = str(error)
        except BaseException:
            with self._lock:
                self._compiling.pop(key, None)
            raise
        finally:
            self._metrics.constraint_compile_seconds.observe(time.perf_counter() - started)
        with self._lock:
            self._compiling.pop(key, None)
            if key not in self._entries:
                self._keep(key, entry)
        if isinstance(entry, str):
            raise InvalidRequestError(entry)
        return entry

    def _keep(self, key: ConstraintKey, entry: Grammar | str) -> None:
        """Insert under the lock, evicting the least recently used past either bound."""
        size = _entry_bytes(key, entry)
        if size > self.max_bytes:
            return
        old = self._entries.pop(key, None)
        if old is not None:
            self._bytes -= _entry_bytes(key, old)
        self._entries[key] = entry
        self._bytes += size
        while len(self._entries) > self.max_entries or self._bytes > self.max_bytes:
            evicted, value = self._entries.popitem(last=False)
            self._bytes -= _entry_bytes(evicted, value)
            self._evictions += 1

    def _refused(self) -> None:
        self._metrics.constraint_lookups.labels("refused").inc()
        self._metrics.requests_rejected.labels("constraint").inc()

    def stats(self) -> CacheStats:
        with self._lock:
            return CacheStats(len(self._entries), self._bytes, self._compiles, self._evictions)


def _entry_bytes(key: ConstraintKey, entry: Grammar | str) -> int:
    if isinstance(entry, Grammar):
        return entry.size_bytes
    return len(entry) + key.size_bytes
