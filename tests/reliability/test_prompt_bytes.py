"""Promise: a huge prompt costs the server almost nothing. Its byte length is checked before any
tokenizer work, and requests are tokenized off the event loop, so health probes sent while 4 MB
prompts are in flight are answered within 100 ms (tokenizing one took 6 s on the event loop)."""

from __future__ import annotations

import threading
import time

import grpc
from tests.reliability.helpers import generation, health_latency, metadata, refusal

from loraserve.v1 import generation_pb2 as gpb
from loraserve.v1 import generation_pb2_grpc

PROMPT = "hello world, " * 307_000  # 3.99 MB: inside grpc's 4 MiB message limit
SENDERS, ROUNDS = 4, 5
PROBE_BUDGET_S = 0.100


def test_a_4mb_prompt_is_refused_while_health_answers_within_100ms(server):
    refusals: list[tuple[grpc.RpcError, float]] = []
    in_flight = threading.Event()

    def send() -> None:
        with grpc.insecure_channel(
            server.address, options=[("grpc.max_send_message_length", 8 << 20)]
        ) as channel:
            stub = generation_pb2_grpc.GenerationServiceStub(channel)
            request = gpb.GenerateRequest(input=generation(PROMPT))
            for _ in range(ROUNDS):
                started = time.perf_counter()
                in_flight.set()
                error = refusal(
                    lambda: stub.Generate(request, metadata=metadata("beta-key"), timeout=60)
                )
                refusals.append((error, time.perf_counter() - started))

    senders = [threading.Thread(target=send) for _ in range(SENDERS)]
    with grpc.insecure_channel(server.address) as channel:
        health_latency(channel)  # connected and warm before the load starts
        for sender in senders:
            sender.start()
        assert in_flight.wait(30)
        probes = []
        while any(sender.is_alive() for sender in senders):
            probes.append(health_latency(channel))
    for sender in senders:
        sender.join()

    assert len(probes) >= 5, "too few probes overlapped the big requests"
    assert max(probes) < PROBE_BUDGET_S, f"slowest of {len(probes)} probes: {max(probes):.3f}s"
    assert len(refusals) == SENDERS * ROUNDS
    for error, _ in refusals:
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error
        assert "above this server's limit of 131072 bytes" in error.details()
    slowest = max(seconds for _, seconds in refusals)
    assert slowest < 5, f"a 4 MB prompt took {slowest:.2f}s to be refused"
