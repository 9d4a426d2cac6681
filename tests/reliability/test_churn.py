"""Promise: uploads and deletes while requests for other adapters run never mix weights: every
answer equals what its adapter version gives alone. Ten adapters (more than the server's four
device slots, so slots churn) under names whose versions hold different adapters' weights, so a
request served from the wrong slot or the wrong version shows.

`pytest --soak` runs the same mix for `--soak-minutes` (30 by default) and checks that the
server's RSS grows by less than 100 MB after the first tenth (warm-up); it is not run in CI.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import grpc
import psutil
import pytest
import torch
from safetensors.torch import load, save
from tests.reliability.helpers import WEIGHTS, Server, adapter_files, metadata, upload

from loraserve_client.v1 import adapters_pb2 as apb
from loraserve_client.v1 import adapters_pb2_grpc, generation_pb2_grpc
from loraserve_client.v1 import generation_pb2 as gpb

pytestmark = pytest.mark.slow
ADAPTERS, CLIENTS, MAX_NEW = 10, 6, 4
PROMPTS = ("The quick brown fox", "LoRA adapts", "Café 🙂 naïve")
KEY = "alpha-key"
SOAK_RSS_GROWTH = 100 << 20


@dataclass
class Report:
    requests: Counter = field(default_factory=Counter)  # outcome -> count
    mismatches: list = field(default_factory=list)
    uploads: int = 0
    deletes: int = 0
    rss: list[tuple[float, int]] = field(default_factory=list)  # (seconds in, bytes)


@pytest.fixture(scope="module")
def weights(server) -> list[dict[str, bytes]]:
    """ADAPTERS distinct adapters: the package's adapter with its tensors redrawn."""
    files = adapter_files(server.adapter)
    tensors = load(files[WEIGHTS])
    made = []
    for seed in range(ADAPTERS):
        generator = torch.Generator().manual_seed(seed)
        redrawn = {
            name: (torch.randn(t.shape, generator=generator) * t.float().std() * 4).to(t.dtype)
            for name, t in tensors.items()
        }
        made.append({**files, WEIGHTS: save(redrawn)})
    return made


def generate(channel: grpc.Channel, name: str, version: str, prompt: str) -> list[int]:
    message = gpb.GenerationInput(
        text=prompt, adapter=gpb.AdapterRef(name=name, version=version), max_new_tokens=MAX_NEW
    )
    stub = generation_pb2_grpc.GenerationServiceStub(channel)
    reply = stub.Generate(gpb.GenerateRequest(input=message), metadata=metadata(KEY), timeout=300)
    return list(reply.token_ids)


def churn(
    server: Server, weights: list[dict[str, bytes]], seconds: float, rounds: int, answers: int = 0
) -> Report:
    """Run CLIENTS request loops and one upload/delete loop until `rounds` uploads are done,
    `answers` requests have been answered OK and `seconds` have passed; every answer is checked
    against its adapter alone. Counting answers, not time, keeps the mix the same on a busy
    machine, where uploads can outpace generation."""
    report = Report()
    live: dict[tuple[str, str], int] = {}  # (name, version) -> index of the weights it holds
    lock = threading.Lock()
    with grpc.insecure_channel(server.address) as channel:
        for i, files in enumerate(weights):
            version = upload(server, KEY, f"churn-{i}", files).adapter.version
            live[f"churn-{i}", version] = i
        expected = {  # each adapter alone, one request at a time
            (i, prompt): generate(channel, f"churn-{i}", version, prompt)
            for (_, version), i in live.items()
            for prompt in PROMPTS
        }
        assert len({tuple(v) for v in expected.values()}) > len(expected) // 2  # weights matter
        stop = threading.Event()
        started = time.monotonic()
        process = psutil.Process(server.pid)

        def client(seed: int) -> None:
            rng = random.Random(seed)
            while not stop.is_set():
                with lock:
                    (name, version), i = rng.choice(sorted(live.items()))
                prompt = rng.choice(PROMPTS)
                try:
                    got = generate(channel, name, version, prompt)
                except grpc.RpcError as error:  # deleted meanwhile: the only allowed failure
                    outcome = error.code().name
                    if error.code() != grpc.StatusCode.NOT_FOUND:
                        report.mismatches.append((name, version, error.details()))
                else:
                    outcome = "OK"
                    if got != expected[i, prompt]:
                        report.mismatches.append((name, version, i, prompt, got))
                with lock:
                    report.requests[outcome] += 1

        def churner() -> None:
            rng = random.Random(-1)
            adapters = adapters_pb2_grpc.AdapterServiceStub(channel)

            def more() -> bool:
                with lock:
                    answered = report.requests["OK"]
                elapsed = time.monotonic() - started
                return report.uploads < rounds or answered < answers or elapsed < seconds

            while more():
                name, i = f"churn-{rng.randrange(ADAPTERS)}", rng.randrange(ADAPTERS)
                version = upload(server, KEY, name, weights[i]).adapter.version
                with lock:
                    live[name, version] = i
                    old = [ref for ref in live if ref[0] == name and ref[1] != version]
                    doomed = rng.choice(old) if old else None
                    if doomed is not None:
                        del live[doomed]
                report.uploads += 1
                if doomed is not None:
                    request = apb.DeleteAdapterRequest(name=doomed[0], version=doomed[1])
                    adapters.DeleteAdapter(request, metadata=metadata(KEY), timeout=60)
                    report.deletes += 1
                report.rss.append((time.monotonic() - started, process.memory_info().rss))
            stop.set()

        threads = [threading.Thread(target=client, args=(n,)) for n in range(CLIENTS)]
        threads.append(threading.Thread(target=churner))
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        adapters = adapters_pb2_grpc.AdapterServiceStub(channel)
        for name in sorted({name for name, _ in live}):
            request = apb.DeleteAdapterRequest(name=name)
            adapters.DeleteAdapter(request, metadata=metadata(KEY), timeout=60)
    return report


def test_uploads_and_deletes_under_load_never_mix_adapters(server, weights):
    report = churn(server, weights, seconds=0, rounds=12, answers=2 * CLIENTS)
    print(f"figure: {dict(report.requests)}, {report.uploads} uploads, {report.deletes} deletes")
    assert report.mismatches == []
    assert report.requests["OK"] >= 2 * CLIENTS and report.deletes >= 6, report


@pytest.mark.timeout(6 * 3600)  # past the suite's 600 s: a soak runs for --soak-minutes
def test_soak(server, weights, request):
    minutes = request.config.getoption("--soak-minutes")
    if not request.config.getoption("--soak"):
        pytest.skip("a 30-minute run for manual use: pytest --soak tests/reliability")
    report = churn(server, weights, seconds=60 * minutes, rounds=0)
    warm = [rss for at, rss in report.rss if at >= 6 * minutes]  # after the first tenth
    assert warm, report
    print(f"figure: {dict(report.requests)}, {report.uploads} uploads, RSS after warm-up "
          f"{warm[0] >> 20} -> {max(warm) >> 20} MiB (max)")  # fmt: skip
    assert report.mismatches == []
    assert max(warm) - warm[0] < SOAK_RSS_GROWTH, (warm[0], max(warm))
