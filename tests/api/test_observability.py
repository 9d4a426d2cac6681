"""What an operator reads from a real `loraserve serve --log-format json`: every line of its log
is JSON from the first (which says what it is loading; no library progress bars or warnings in
between), one access line per generation call, streams ending OK (never UNKNOWN) under
concurrent CLI, Python-client and raw gRPC clients, and the process_* metrics."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from tests.api.server_process import free_port, running_server, scrape, value

from loraserve_client import Client, Finished, InvalidArgument
from loraserve_client.v1 import generation_pb2 as gpb
from loraserve_client.v1 import generation_pb2_grpc

pytestmark = pytest.mark.slow  # a real server process

KEY = "observability-key"
STREAM = "GenerateStream"


@pytest.fixture(scope="module")
def server(model_dirs, adapter_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("observability")
    keys = root / "keys.json"
    keys.write_text(json.dumps({"keys": [{"key": KEY, "tenant": "acme", "scopes": ["generate"]}]}))
    metrics_port = free_port()
    log_path = root / "server.log"
    adapter = adapter_dirs["llama"]["r4-attn"]
    flags = [
        "--model", str(model_dirs["llama"]), "--device", "cpu", "--log-format", "json",
        "--metrics-port", str(metrics_port), "--api-keys", str(keys), "--max-context", "256",
        "--adapter-dir", str(root / "store"), "--adapter", f"first={adapter}",
    ]  # fmt: skip
    with running_server(*flags, log_path=log_path) as (address, _):
        yield address, metrics_port, log_path


def log_lines(log_path: Path) -> list[dict]:
    return [json.loads(line) for line in log_path.read_text().splitlines()]


def access_lines(log_path: Path, method: str) -> list[dict]:
    return [
        line
        for line in log_path.read_text().splitlines()
        if '"loraserve.access"' in line and json.loads(line)["method"] == method
    ]


def test_every_log_line_is_json_and_the_first_says_what_is_loading(server, model_dirs):
    _, _, log_path = server
    lines = log_lines(log_path)  # raises on any line that is not JSON (a progress bar, say)
    assert "starting: loading" in lines[0]["message"]
    assert str(model_dirs["llama"]) in lines[0]["message"]
    assert {"time", "level", "logger", "message"} <= set(lines[0])
    assert any(line["message"].startswith("SERVING") for line in lines)


def access_lines_with(log_path: Path, method: str, statuses: set[str]) -> list[dict]:
    """`method`'s access lines once one with each of `statuses` is written. An OK unary call's
    line is written before its reply is sent; a refused call's status goes out first (grpc
    sends an abort's status at once), so its line can follow the client's error by a moment."""
    deadline = time.monotonic() + 30
    while True:
        lines = [json.loads(line) for line in access_lines(log_path, method)]
        if statuses <= {line["status"] for line in lines} or time.monotonic() > deadline:
            return lines
        time.sleep(0.05)


def test_each_generation_call_writes_one_access_line(server):
    address, _, log_path = server
    with Client(address, api_key=KEY, timeout=60) as client:
        result = client.generate("hello there", adapter="first", max_new_tokens=4, ignore_eos=True)
        with pytest.raises(InvalidArgument):
            client.generate("hello", max_new_tokens=5000)
    unary = access_lines_with(log_path, "Generate", {"OK", "INVALID_ARGUMENT"})
    ok = next(line for line in unary if line["status"] == "OK")
    assert ok["tenant"] == "acme" and ok["adapter"] == "first"
    assert ok["prompt_tokens"] == result.prompt_tokens > 0
    assert ok["completion_tokens"] == 4
    assert 0 <= ok["ttft_s"] <= ok["duration_s"]
    refused = next(line for line in unary if line["status"] == "INVALID_ARGUMENT")
    assert refused["completion_tokens"] == 0 and refused["ttft_s"] is None


def cli_stream(address: str) -> None:
    env = {**os.environ, "LORASERVE_API_KEY": KEY, "LORASERVE_SERVER": address}
    command = [sys.executable, "-m", "loraserve.cli", "generate", "--stream", "--ignore-eos",
               "--max-new-tokens", "3", "--adapter", "first", "from the CLI"]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def client_stream(address: str) -> None:
    with Client(address, api_key=KEY, timeout=60) as client:
        stream = client.generate_stream("from Python", max_new_tokens=3, ignore_eos=True)
        assert isinstance(list(stream)[-1], Finished)


def raw_stream(address: str) -> None:
    """Read up to the final event, then cancel at once and close the channel."""
    with grpc.insecure_channel(address) as channel:
        stub = generation_pb2_grpc.GenerationServiceStub(channel)
        message = gpb.GenerationInput(text="raw", max_new_tokens=3, ignore_eos=True)
        call = stub.GenerateStream(
            gpb.GenerateStreamRequest(input=message),
            metadata=(("authorization", f"Bearer {KEY}"),),
            timeout=60,
        )
        for reply in call:
            if reply.HasField("final"):
                call.cancel()
                return
    raise AssertionError("the stream ended without a final event")


def test_streams_end_ok_whichever_client_hangs_up_after_the_final_event(
    model_dirs, adapter_dirs, tmp_path
):
    """Each stream's access line carries the status it is counted with (the same value, in
    one place: tests/api/test_access.py). SIGTERM drains, so once the process has exited
    every call's line is in the log: no polling."""
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({"keys": [{"key": KEY, "tenant": "acme", "scopes": ["generate"]}]}))
    adapter = adapter_dirs["llama"]["r4-attn"]
    log_path = tmp_path / "server.log"
    flags = ["--model", str(model_dirs["llama"]), "--device", "cpu", "--log-format", "json",
             "--api-keys", str(keys), "--adapter-dir", str(tmp_path / "store"),
             "--adapter", f"first={adapter}"]  # fmt: skip
    clients = [cli_stream] * 4 + [client_stream] * 6 + [raw_stream] * 8
    with running_server(*flags, log_path=log_path) as (address, process):
        with ThreadPoolExecutor(len(clients)) as pool:
            for done in [pool.submit(run, address) for run in clients]:
                done.result()
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=120) == 0
    streams = [json.loads(line) for line in access_lines(log_path, STREAM)]
    assert len(streams) == len(clients)
    assert {line["status"] for line in streams} == {"OK"}
    assert {(line["tenant"], line["completion_tokens"]) for line in streams} == {("acme", 3)}
    assert sum(line["adapter"] == "first" for line in streams) == 4  # the CLI's


def test_process_metrics_are_exported(server):
    _, port, _ = server
    text = scrape(port)
    assert value(text, "process_cpu_seconds_total") > 0
    assert value(text, "process_resident_memory_bytes") > 0
    assert "python_info" in text
