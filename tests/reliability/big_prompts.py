"""Send 4 MB prompts from their own process, so the test's health probes share no interpreter
lock with the senders: `python -m tests.reliability.big_prompts ADDRESS KEY SENDERS ROUNDS`.

Prints "sending" once the first request is on its way, then one JSON line per reply:
{"code": status name, "details": message, "seconds": round trip}.
"""

from __future__ import annotations

import json
import sys
import threading
import time

import grpc

from loraserve_client.v1 import generation_pb2 as gpb
from loraserve_client.v1 import generation_pb2_grpc

PROMPT = "hello world, " * 307_000  # 3.99 MB: inside grpc's 4 MiB message limit


def send(address: str, key: str, rounds: int, started: threading.Event, lock: threading.Lock):
    options = [("grpc.max_send_message_length", 8 << 20)]
    with grpc.insecure_channel(address, options=options) as channel:
        stub = generation_pb2_grpc.GenerationServiceStub(channel)
        message = gpb.GenerationInput(text=PROMPT, max_new_tokens=8, ignore_eos=True)
        request = gpb.GenerateRequest(input=message)
        for _ in range(rounds):
            began = time.perf_counter()
            with lock:
                if not started.is_set():
                    print("sending", flush=True)
                    started.set()
            try:
                stub.Generate(request, metadata=(("authorization", f"Bearer {key}"),), timeout=60)
                code, details = "OK", ""
            except grpc.RpcError as error:
                code, details = error.code().name, error.details()
            reply = {"code": code, "details": details, "seconds": time.perf_counter() - began}
            with lock:
                print(json.dumps(reply), flush=True)


def main(address: str, key: str, senders: str, rounds: str) -> None:
    started, lock = threading.Event(), threading.Lock()
    threads = [
        threading.Thread(target=send, args=(address, key, int(rounds), started, lock))
        for _ in range(int(senders))
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


if __name__ == "__main__":
    main(*sys.argv[1:])
