"""Metrics read the way their consumers read them: the exposition, promtool, a real Prometheus
server, and the inference gateway's parsing of the vllm:* gauges."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families
from tests.api.server_process import (
    free_port,
    running_server,
    samples,
    scrape,
    value,
    wait_for_waiting,
)
from tests.prometheus_process import running_prometheus

from loraserve.config import EngineConfig
from loraserve.model.kernels import native
from loraserve.model.linear import ranges_alike
from loraserve_client import Client, InvalidArgument, ResourceExhausted, Unauthenticated
from loraserve_client.v1 import generation_pb2 as gpb
from loraserve_client.v1 import generation_pb2_grpc

pytestmark = pytest.mark.slow  # real server processes and Prometheus

REPO = Path(__file__).resolve().parents[2]
PATHS = ("replayed", "recorded", "eager")  # how a CPU decode step ran
KEY = "metrics-key"


@pytest.fixture(scope="module")
def server(model_dirs, adapter_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("metrics-server")
    keys = root / "keys.json"
    scopes = ["generate", "adapters:write", "admin"]
    keys.write_text(json.dumps({"keys": [{"key": KEY, "tenant": "acme", "scopes": scopes}]}))
    metrics_port = free_port()
    flags = [
        "--model", str(model_dirs["llama"]), "--device", "cpu", "--device-slots", "1",
        "--metrics-port", str(metrics_port), "--metrics-names", "--api-keys", str(keys),
        "--adapter-dir", str(root / "store"), "--max-context", "600", "--compute-threads", "1",
        "--adapter", f"first={adapter_dirs['llama']['r4-attn']}",
        "--adapter", f"second={adapter_dirs['llama']['r8-all']}",
        "--speculative-tokens", "2",  # drafts checked in decode steps: the accounting holds
    ]  # fmt: skip
    with running_server(*flags, log_path=root / "server.log") as (address, _):
        yield address, metrics_port


def test_every_metric_moves_as_requests_run_fail_and_adapters_churn(server, adapter_dirs):
    address, port = server
    before = scrape(port)
    completions = 0
    with Client(address, api_key=KEY, timeout=60) as client:
        for adapter in ("first", "second", "first", None, "second"):  # 1 slot: evictions
            completions += client.generate(
                "hello", adapter=adapter, max_new_tokens=5
            ).completion_tokens
        with pytest.raises(InvalidArgument):
            client.generate("hello", max_new_tokens=5000)  # over the context: token budget
        client.upload_adapter(adapter_dirs["llama"]["r1-qv"], "uploaded", progress=False)
        with pytest.raises(InvalidArgument):
            client.upload_adapter(adapter_dirs["llama"]["r1-qv"], "../bad", progress=False)
    with Client(address, api_key="not-a-key") as stranger, pytest.raises(Unauthenticated):
        stranger.generate("hello", max_new_tokens=2)
    after = scrape(port)

    def delta(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("loraserve_requests_received_total", tenant="acme") == 5
    assert (
        delta("loraserve_requests_finished_total", tenant="acme", finish_reason="length")
        + delta("loraserve_requests_finished_total", tenant="acme", finish_reason="eos")
        == 5
    )
    assert delta("loraserve_generated_tokens_total", tenant="acme") == completions
    assert delta("loraserve_prompt_tokens_total", tenant="acme") > 0
    assert delta("loraserve_time_to_first_token_seconds_count") == 5
    assert delta("loraserve_inter_token_latency_seconds_count") == completions - 5
    assert delta("loraserve_request_duration_seconds_count") == 5
    assert delta("loraserve_queue_time_seconds_count") == 5
    assert delta("loraserve_step_duration_seconds_count", phase="decode") > 0
    assert delta("loraserve_step_duration_seconds_count", phase="prefill") >= 5
    assert delta("loraserve_batch_size_count") > 0
    # every token fed once: the prompts but what the prefix cache held (the third "hello" on
    # "first" finds the first's tokens), each generated token but a request's last, and the
    # drafted tokens the model checked and greedy decoding did not pick
    reused = 16 * delta("loraserve_prefix_cache_hit_blocks_total")
    reused += delta("loraserve_prefix_cache_copied_tokens_total")
    assert reused > 0
    assert delta("loraserve_step_tokens_sum") == (
        delta("loraserve_prompt_tokens_total", tenant="acme")
        - reused
        + completions
        - 5
        + delta("loraserve_draft_tokens_total", result="rejected")
    )
    assert delta("loraserve_grpc_responses_total", method="Generate", code="OK") == 5
    assert delta("loraserve_grpc_responses_total", method="Generate", code="INVALID_ARGUMENT") == 1
    assert delta("loraserve_requests_rejected_total", reason="token_budget") == 1
    assert delta("loraserve_requests_rejected_total", reason="auth") == 1
    assert delta("loraserve_adapter_cache_misses_total", tier="device") >= 4
    assert delta("loraserve_adapter_evictions_total", tier="device") >= 3
    assert delta("loraserve_adapter_load_seconds_count", tier="device") >= 4
    assert delta("loraserve_adapter_uploads_total", result="published") == 1
    assert delta("loraserve_adapter_uploads_total", result="invalid") == 1
    assert delta("loraserve_adapter_upload_bytes_total") > 0
    assert value(after, "loraserve_adapter_slots") == 1
    assert value(after, "loraserve_adapter_slots_used") == 1
    assert value(after, "loraserve_adapter_resident_bytes", tier="host") > 0
    assert value(after, "loraserve_requests_running") == 0
    assert value(after, "loraserve_kv_cache_usage_ratio") == 0
    info = [f for f in text_string_to_metric_families(after) if f.name == "loraserve_build_info"]
    assert info and info[0].samples[0].labels["quantization"] == "nf4"
    assert info[0].samples[0].labels["compute_threads"] == "1"
    assert value(after, "loraserve_compute_threads") == 1  # one thread: nothing to govern
    if native() is not None:  # the server's CPU is this one: it counts its ops' waits too
        assert ("loraserve_compute_team_wait_seconds_total", ()) in samples(after)
        # and replays records of its decode forward, made at start-up for every batch size on
        # the base and on adapters, so no request's step records one (a first decode step
        # drafts nothing: "hello"'s last token occurs once in it, so no n-gram matches)
        most = EngineConfig().max_batch_size
        assert value(before, "loraserve_decode_records") == 2 * len(ranges_alike(most))
        paths = {p: delta("loraserve_decode_steps_total", path=p) for p in PATHS}
        assert paths["recorded"] == delta("loraserve_decode_records") == 0
        assert paths["replayed"] > 0
        assert sum(paths.values()) <= delta("loraserve_step_duration_seconds_count", phase="decode")


def promtool_check(exposition: str) -> list[str]:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool not found: the README's set-up installs Debian's prometheus")
    result = subprocess.run(
        [promtool, "check", "metrics"], input=exposition, capture_output=True, text=True
    )
    return (result.stdout + result.stderr).splitlines()


def test_promtool_finds_nothing_but_the_gateway_contracts_colons(server):
    """Our own families lint clean. The vllm:* names are fixed by the gateways that scrape
    them, and promtool's only remark on them is the colon those names must have."""
    exposition = scrape(server[1])
    remarks = promtool_check(exposition)
    gateway = {"vllm:num_requests_waiting", "vllm:num_requests_running",
               "vllm:kv_cache_usage_perc", "vllm:lora_requests_info"}  # fmt: skip
    assert {r.split()[0] for r in remarks} == gateway
    assert all(r.endswith("metric names should not contain ':'") for r in remarks)
    own = "\n".join(line for line in exposition.splitlines() if "vllm:" not in line) + "\n"
    assert promtool_check(own) == []


def gateway_view(text: str) -> dict:
    """Parse the vllm:* gauges as the Gateway API Inference Extension does."""
    families = {f.name: f for f in text_string_to_metric_families(text)}
    lora = max(families["vllm:lora_requests_info"].samples, key=lambda s: s.value)
    split = lambda csv: [a for a in csv.split(",") if a]  # noqa: E731
    return {
        "waiting": families["vllm:num_requests_waiting"].samples[0].value,
        "running": families["vllm:num_requests_running"].samples[0].value,
        "kv": families["vllm:kv_cache_usage_perc"].samples[0].value,
        "running_adapters": split(lora.labels["running_lora_adapters"]),
        "waiting_adapters": split(lora.labels["waiting_lora_adapters"]),
        "max_lora": int(lora.labels["max_lora"]),
        "updated": lora.value,
    }


def test_gateway_gauges_name_the_running_and_waiting_adapters(server):
    address, port = server
    metadata = (("authorization", f"Bearer {KEY}"),)
    with grpc.insecure_channel(address) as channel:
        stub = generation_pb2_grpc.GenerationServiceStub(channel)

        def stream(adapter: str):
            text = gpb.GenerationInput(
                text="hi", adapter=gpb.AdapterRef(name=adapter), max_new_tokens=400, ignore_eos=True
            )
            return stub.GenerateStream(
                gpb.GenerateStreamRequest(input=text), metadata=metadata, timeout=120
            )

        running = stream("first")
        next(running)
        waiting = stream("second")  # one slot, held by "first": waits
        deadline = time.monotonic() + 30
        while True:
            view = gateway_view(scrape(port))
            if view["waiting_adapters"] or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert view["running_adapters"] == ["first"]
        assert view["waiting_adapters"] == ["second"]
        assert view["running"] == 1 and view["waiting"] == 1
        assert view["max_lora"] == 1
        assert 0 < view["kv"] <= 1
        assert abs(view["updated"] - time.time()) < 60
        lora_series = [
            s for f in text_string_to_metric_families(scrape(port))
            if f.name == "vllm:lora_requests_info" for s in f.samples
        ]  # fmt: skip
        assert len(lora_series) == 1
        running.cancel()
        waiting.cancel()


def test_a_real_prometheus_scrapes_our_series(server, tmp_path):
    address, metrics_port = server
    shipped = (REPO / "deploy" / "prometheus" / "prometheus.yml").read_text()
    assert "127.0.0.1:9400" in shipped
    config = tmp_path / "prometheus.yml"
    config.write_text(shipped.replace("127.0.0.1:9400", f"127.0.0.1:{metrics_port}"))
    with Client(address, api_key=KEY, timeout=60) as client:
        client.generate("scraped", max_new_tokens=3)
    want = value(scrape(metrics_port), "loraserve_requests_received_total", tenant="acme")
    with running_prometheus(config, tmp_path / "tsdb") as prometheus:
        query = 'loraserve_requests_received_total{tenant="acme"}'
        assert prometheus.wait_for(query, want) == want


def test_queue_full_rejections_are_counted(model_dirs, tmp_path):
    port = free_port()
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"max_waiting": 1, "max_batch_size": 1}))
    flags = ["--model", str(model_dirs["llama"]), "--device", "cpu", "--config", str(config),
             "--metrics-port", str(port)]  # fmt: skip
    with running_server(*flags, log_path=tmp_path / "server.log") as (address, _):
        with grpc.insecure_channel(address) as channel:
            stub = generation_pb2_grpc.GenerationServiceStub(channel)
            long = gpb.GenerationInput(text="hi", max_new_tokens=500, ignore_eos=True)
            first = stub.GenerateStream(gpb.GenerateStreamRequest(input=long), timeout=120)
            next(first)
            second = stub.Generate.future(gpb.GenerateRequest(input=long), timeout=120)
            wait_for_waiting(port, 1)  # the queue holds its one request
            with Client(address, timeout=30) as client, pytest.raises(ResourceExhausted):
                client.generate("hi", max_new_tokens=5)
            first.cancel()
            second.cancel()
        text = scrape(port)
    assert value(text, "loraserve_requests_rejected_total", reason="queue_full") == 1


def test_deadlines_and_cancels_leave_the_batch_at_once(server):
    """The engine ends such requests as cancelled (not by length) and frees their slot and KV."""
    address, port = server
    metadata = (("authorization", f"Bearer {KEY}"),)
    before = scrape(port)
    long = gpb.GenerationInput(text="hi", max_new_tokens=500, ignore_eos=True)
    with grpc.insecure_channel(address) as channel:
        stub = generation_pb2_grpc.GenerationServiceStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            stub.Generate(gpb.GenerateRequest(input=long), metadata=metadata, timeout=0.3)
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        stream = stub.GenerateStream(
            gpb.GenerateStreamRequest(input=long), metadata=metadata, timeout=60
        )
        next(stream)
        stream.cancel()
    responses = "loraserve_grpc_responses_total"

    def counted(after: str, method: str, code: str) -> bool:
        return value(after, responses, method=method, code=code) > value(
            before, responses, method=method, code=code
        )

    def settled(after: str) -> dict[str, bool]:
        """What must hold once both requests are over. The engine counts a request finished
        just before it frees its place, and the RPC layer counts responses on its own thread:
        a scrape on a busy machine may fall between any of them. The expired Generate is
        DEADLINE_EXCEEDED where the server's own deadline has passed when the client's cancel
        reaches it; on a loaded machine the server may have taken the call in late, so that
        its deadline (counted from then) is still ahead: then it is CANCELLED."""
        cancelled = value(after, "loraserve_requests_finished_total", tenant="acme",
                          finish_reason="cancelled") - value(
            before, "loraserve_requests_finished_total", tenant="acme", finish_reason="cancelled"
        )  # fmt: skip
        return {
            "both finished as cancelled": cancelled == 2,
            "none running": value(after, "loraserve_requests_running") == 0,
            "no KV held": value(after, "loraserve_kv_cache_usage_ratio") == 0,
            "Generate counted as DEADLINE_EXCEEDED or CANCELLED": any(
                counted(after, "Generate", code) for code in ("DEADLINE_EXCEEDED", "CANCELLED")
            ),
            "GenerateStream counted as CANCELLED": counted(after, "GenerateStream", "CANCELLED"),
        }

    deadline = time.monotonic() + 20
    while not all(settled(after := scrape(port)).values()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert all(settled(after).values()), settled(after)
    rejected = value(after, "loraserve_requests_rejected_total", reason="deadline") - value(
        before, "loraserve_requests_rejected_total", reason="deadline"
    )
    assert rejected == counted(after, "Generate", "DEADLINE_EXCEEDED")
