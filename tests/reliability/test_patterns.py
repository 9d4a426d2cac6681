"""Promise: rank_pattern / alpha_pattern keys run on a linear-time engine, so a key that makes a
backtracking engine take exponential time (nested `(?:.*)` groups) is handled in well under a
second, and another tenant's stream goes on at its usual pace meanwhile. Python's `re` would
try every way to split the module path among the nested stars, for every module."""

from __future__ import annotations

import statistics
import threading
import time

from tests.reliability.helpers import (
    Stream,
    adapter_files,
    generation,
    read_stream,
    upload,
    with_config,
)

# Never matches a module path (none ends in "x"), after trying every split of it.
BACKTRACKING = "(?:(?:(?:.*)*)*)*x"
UPLOAD_BUDGET_S = 1.0
TOKENS = 120


def test_a_backtracking_pattern_neither_stalls_the_upload_nor_another_tenant(server):
    files = adapter_files(server.adapter)
    hostile = with_config(
        files,
        lambda config: config.update(
            alpha_pattern={f"{BACKTRACKING}{i}": 2.0 for i in range(64)},
            rank_pattern={f"model.layers.{i}.(?:(?:.*)*)*y": 4 for i in range(64)},
        ),
    )
    upload(server, "alpha-key", "pattern-warmup", files)  # the upload path itself, warmed

    beta = Stream()
    reader = threading.Thread(
        target=read_stream,
        args=(server, "beta-key", generation("The quick brown fox", max_new_tokens=TOKENS), beta),
    )
    reader.start()
    while len(beta.arrivals) < 20 and reader.is_alive():  # beta is streaming at its pace
        time.sleep(0.01)
    started = time.perf_counter()
    reply = upload(server, "alpha-key", "pattern-hostile", hostile)
    ended = time.perf_counter()
    reader.join(timeout=120)

    assert reply.adapter.lora_alpha == 8.0  # no key matched: PEFT's default alpha applies
    assert ended - started < UPLOAD_BUDGET_S, f"the upload took {ended - started:.2f}s"
    assert beta.error is None and beta.finished and len(beta.arrivals) == TOKENS
    before = beta.gaps(before=started)
    during = beta.gaps(after=started, before=ended + 0.5)
    usual = statistics.median(before)
    assert max(during, default=0.0) < max(0.5, 10 * usual), (
        f"beta waited {max(during):.3f}s between tokens during the upload (usually {usual:.3f}s)"
    )
