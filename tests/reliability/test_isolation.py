"""Promise: one request whose next-token scores are not finite fails alone. Tenant alpha's
adapter has finite weights (so it is accepted) that overflow inside the model; its requests end
INVALID_ARGUMENT while tenant beta's streams, decoding in the same batches, all finish."""

from __future__ import annotations

import threading
import time

import grpc
from safetensors.torch import load, save
from tests.reliability.helpers import (
    WEIGHTS,
    Stream,
    adapter_files,
    generation,
    health_latency,
    read_stream,
    upload,
)

TOKENS = 100


def test_a_nan_producing_row_fails_alone(server):
    files = adapter_files(server.adapter)
    tensors = {name: t * 1e30 for name, t in load(files[WEIGHTS]).items()}
    upload(server, "alpha-key", "loud", {**files, WEIGHTS: save(tensors)})

    prompts = ["The quick brown fox", "LoRA adapts a frozen", "def forward(self, x):", "Emoji"]
    innocents = [Stream() for _ in prompts]
    readers = [
        threading.Thread(
            target=read_stream,
            args=(server, "beta-key", generation(p, max_new_tokens=TOKENS, seed=i), s),
        )
        for i, (p, s) in enumerate(zip(prompts, innocents))
    ]
    for reader in readers:
        reader.start()
    while any(len(s.arrivals) < 2 for s in innocents) and all(r.is_alive() for r in readers):
        time.sleep(0.01)  # every innocent stream is decoding: the culprits join their batch

    culprits = [Stream() for _ in range(3)]
    sampling = [{}, {"temperature": 1e-3, "seed": 1}, {"temperature": 0.7, "top_k": 5}]
    culprit_readers = [
        threading.Thread(
            target=read_stream,
            args=(server, "alpha-key", generation("Hello", "loud", 8, **params), culprit),
        )
        for culprit, params in zip(culprits, sampling)
    ]
    for reader in culprit_readers:
        reader.start()
    for reader in culprit_readers:
        reader.join(timeout=120)
    culprits_done = time.perf_counter()
    for reader in readers:
        reader.join(timeout=120)

    for culprit in culprits:
        assert culprit.error is not None and culprit.arrivals == []
        assert culprit.error.code() == grpc.StatusCode.INVALID_ARGUMENT, culprit.error
        assert "not finite" in culprit.error.details()
    for innocent in innocents:
        assert innocent.error is None, innocent.error
        assert innocent.finished and len(innocent.arrivals) == TOKENS
    assert all(s.arrivals[-1] > culprits_done for s in innocents), "no shared batch"
    with grpc.insecure_channel(server.address) as channel:
        assert health_latency(channel) < 5
