"""The compiled-constraint cache: one compile per distinct constraint however many ask at once,
least recently used evicted past the entry and byte bounds, refusals remembered, the size limit
checked before any compile, and the deadline: a compile that outlives it is refused quickly
(and stays refused), one that never started because the pool was busy is RESOURCE_EXHAUSTED."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from loraserve.engine.constraint_cache import COMPILE_WORKERS, ConstraintCache
from loraserve.metrics import Metrics
from loraserve.model.grammar import Grammar, GrammarCompiler
from loraserve.model.tiny import build_tokenizer
from loraserve.types import CapacityError, Constraint, ConstraintKind, InvalidRequestError


def regex(text: str) -> Constraint:
    return Constraint(ConstraintKind.REGEX, text)


class FakeCompiler:
    """Grammars of a given size; a constraint whose text starts with "slow" blocks until
    `release` is set, one starting with "bad" is refused. Counts the compiles of each text."""

    def __init__(self, size: int = 100) -> None:
        self.size = size
        self.release = threading.Event()
        self.compiles: dict[str, int] = {}
        self._lock = threading.Lock()

    def __call__(self, constraint: Constraint) -> Grammar:
        with self._lock:
            self.compiles[constraint.text] = self.compiles.get(constraint.text, 0) + 1
        if constraint.text.startswith("slow"):
            assert self.release.wait(30), "the test never released the compile"
        if constraint.text.startswith("bad"):
            raise InvalidRequestError(f"the regex constraint is refused: {constraint.text}")
        return Grammar(template=None, size_bytes=self.size)  # type: ignore[arg-type]


def make_cache(compiler, **bounds) -> ConstraintCache:
    settings = dict(max_constraint_bytes=1000, max_entries=4, max_bytes=10_000, timeout_s=5.0)
    settings.update(bounds)
    return ConstraintCache(compiler, metrics=Metrics(), **settings)


def lookups(cache: ConstraintCache, result: str) -> float:
    return cache._metrics.constraint_lookups.labels(result)._value.get()


def test_concurrent_requests_for_one_constraint_share_one_compile():
    compiler = FakeCompiler()
    cache = make_cache(compiler)
    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(cache.get, regex("slow-a")) for _ in range(8)]
        while not compiler.compiles:
            time.sleep(0.01)
        compiler.release.set()
        grammars = {id(f.result(timeout=30)) for f in futures}
    assert len(grammars) == 1 and compiler.compiles == {"slow-a": 1}
    hits = lookups(cache, "hit")  # callers that came after the compile ended count as hits too
    assert cache.get(regex("slow-a")) is futures[0].result()
    assert cache.stats().compiles == 1 and lookups(cache, "hit") == hits + 1


def test_least_recently_used_entries_go_past_the_entry_bound():
    compiler = FakeCompiler()
    cache = make_cache(compiler, max_entries=3)
    for text in ("a", "b", "c"):
        cache.get(regex(text))
    cache.get(regex("a"))  # now b is the least recently used
    cache.get(regex("d"))
    for text in ("a", "c", "d"):
        cache.get(regex(text))
    assert compiler.compiles == {"a": 1, "b": 1, "c": 1, "d": 1}
    cache.get(regex("b"))
    assert compiler.compiles["b"] == 2
    assert cache.stats().entries == 3 and cache.stats().evictions == 2


def test_the_byte_bound_evicts_and_an_oversized_grammar_is_used_but_not_kept():
    compiler = FakeCompiler(size=400)
    cache = make_cache(compiler, max_entries=100, max_bytes=1000)
    for text in ("a", "b", "c"):
        cache.get(regex(text))
    assert cache.stats().entries == 2 and cache.stats().bytes == 800
    compiler.size = 5000
    assert cache.get(regex("huge")).size_bytes == 5000
    assert cache.stats().entries == 2
    cache.get(regex("huge"))
    assert compiler.compiles["huge"] == 2


def test_a_refusal_is_remembered_and_the_size_limit_needs_no_compile():
    compiler = FakeCompiler()
    cache = make_cache(compiler, max_constraint_bytes=10)
    for _ in range(3):
        with pytest.raises(InvalidRequestError, match="refused: bad"):
            cache.get(regex("bad1"))
    assert compiler.compiles == {"bad1": 1}
    with pytest.raises(InvalidRequestError, match="11 bytes, above this server's limit of 10"):
        cache.get(regex("x" * 11))
    choices = Constraint(ConstraintKind.CHOICE, choices=("ééé", "ab"))  # 8 bytes: within
    cache.get(choices)
    with pytest.raises(InvalidRequestError, match="above"):
        cache.get(Constraint(ConstraintKind.CHOICE, choices=("ééé", "abc", "de")))
    assert lookups(cache, "refused") == 5 and "x" * 11 not in compiler.compiles


def test_a_compile_past_its_deadline_is_refused_quickly_and_stays_refused():
    compiler = FakeCompiler()
    cache = make_cache(compiler, timeout_s=0.2)
    started = time.perf_counter()
    with pytest.raises(InvalidRequestError, match=r"did not compile within 0\.2 s"):
        cache.get(regex("slow-hostile"))
    assert time.perf_counter() - started < 5
    compiler.release.set()  # it finishes later: the refusal stays
    while cache._compiling:
        time.sleep(0.01)
    with pytest.raises(InvalidRequestError, match="did not compile"):
        cache.get(regex("slow-hostile"))
    assert compiler.compiles == {"slow-hostile": 1}
    assert cache.get(regex("fine")) is not None


def test_a_full_pool_says_retry_later():
    compiler = FakeCompiler()
    # A second's deadline: a caller descheduled on a loaded machine still waits within it.
    cache = make_cache(compiler, timeout_s=1.0)
    with ThreadPoolExecutor(COMPILE_WORKERS) as pool:
        busy = [pool.submit(cache.get, regex(f"slow-{i}")) for i in range(COMPILE_WORKERS)]
        while len(compiler.compiles) < COMPILE_WORKERS:
            time.sleep(0.01)
        with pytest.raises(CapacityError, match="busy"):
            cache.get(regex("queued-behind"))  # never started within its deadline
        for future in busy:  # released only after: a late caller cannot see its compile end
            with pytest.raises(InvalidRequestError):  # these did run past their deadline
                future.result(timeout=30)
        compiler.release.set()
    assert "queued-behind" not in compiler.compiles
    assert cache.get(regex("queued-behind")) is not None  # the pool is free again


def test_real_grammars_are_compiled_once_and_started_fresh():
    tokenizer = build_tokenizer(512)
    compiler = GrammarCompiler(tokenizer, 512, [tokenizer.eos_token_id])
    cache = make_cache(compiler.compile, max_bytes=10**7)
    grammar = cache.get(regex("[a-c]{3}"))
    assert cache.get(regex("[a-c]{3}")) is grammar
    first, second = grammar.start(), grammar.start()
    assert first.accept(tokenizer.convert_tokens_to_ids("a"))
    assert second.accept(tokenizer.convert_tokens_to_ids("b"))
    with pytest.raises(InvalidRequestError, match="unclosed group"):
        cache.get(regex("(("))
