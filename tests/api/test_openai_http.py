"""The OpenAI-compatible HTTP API with the official `openai` package, against a real server
process on loopback that also serves gRPC: the same greedy tokens as gRPC for the same request
(the adapter named by `model`), streaming and not, chat through the model's chat template,
tenancy, keys and scopes, limits, and a full queue as 429 with Retry-After."""

from __future__ import annotations

import http.client
import json
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import openai
import pytest
from tests.api.server_process import free_port, running_server, scrape, value, wait_for_waiting
from tests.reliability.helpers import keys_file
from transformers import AutoTokenizer

from loraserve_client import Client

pytestmark = pytest.mark.slow  # a real server process

KEYS = {
    "alpha-key": {"tenant": "alpha", "scopes": ["generate", "adapters:write"]},
    "beta-key": {"tenant": "beta", "scopes": ["generate", "adapters:write"]},
    "ops-key": {"tenant": "alpha", "scopes": ["admin"]},
    "one-key": {"tenant": "one-at-a-time", "scopes": ["generate"]},
}
QUOTAS = {"one-at-a-time": {"max_requests_in_flight": 1}}
PROMPT = "The quick brown fox"
TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
MAX_PROMPT_BYTES = 4000
BASE = "tiny-base"
GREEDY = {"temperature": 0, "extra_body": {"ignore_eos": True, "return_token_ids": True}}


@dataclass(frozen=True)
class Served:
    grpc_address: str
    base_url: str
    metrics_port: int
    model_dir: Path

    def openai(self, key: str) -> openai.OpenAI:
        return openai.OpenAI(api_key=key, base_url=self.base_url, max_retries=0, timeout=120)

    def grpc(self, key: str) -> Client:
        return Client(self.grpc_address, api_key=key, timeout=120)


def with_chat_template(source: Path, target: Path) -> Path:
    """A copy of the tiny model whose tokenizer has a chat template."""
    shutil.copytree(source, target)
    tokenizer = AutoTokenizer.from_pretrained(target)
    tokenizer.chat_template = TEMPLATE
    tokenizer.save_pretrained(target)
    return target


@pytest.fixture(scope="module")
def served(model_dirs, adapter_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("openai-http")
    model = with_chat_template(model_dirs["llama"], root / "model")
    keys = keys_file(root / "keys.json", KEYS, QUOTAS)
    http_port, metrics_port = free_port(), free_port()
    flags = [
        "--model", str(model), "--device", "cpu", "--api-keys", str(keys),
        "--adapter-dir", str(root / "store"), "--http-port", str(http_port),
        "--metrics-port", str(metrics_port), "--max-batch-size", "1", "--max-waiting", "1",
        "--max-prompt-bytes", str(MAX_PROMPT_BYTES), "--served-model-name", BASE,
    ]  # fmt: skip
    with running_server(*flags, log_path=root / "server.log") as (address, _):
        served = Served(address, f"http://127.0.0.1:{http_port}/v1", metrics_port, model)
        with served.grpc("alpha-key") as alpha:
            alpha.upload_adapter(adapter_dirs["llama"]["r8-all"], "sql", progress=False)
        yield served


def test_completions_give_the_grpc_tokens_for_the_adapter_named_by_model(served):
    with served.grpc("alpha-key") as grpc_client:
        want = grpc_client.generate(PROMPT, adapter="sql", max_new_tokens=8, ignore_eos=True)
        base = grpc_client.generate(PROMPT, max_new_tokens=8, ignore_eos=True)
    assert want.token_ids != base.token_ids  # the adapter changes the output: `model` matters
    api = served.openai("alpha-key")
    got = api.completions.create(model="sql", prompt=PROMPT, max_tokens=8, **GREEDY)
    choice = got.choices[0]
    assert choice.token_ids == want.token_ids and choice.text == want.text
    assert choice.finish_reason == "length" and got.model == "sql"
    assert (got.usage.prompt_tokens, got.usage.completion_tokens) == (want.prompt_tokens, 8)
    assert got.usage.total_tokens == want.prompt_tokens + 8
    on_base = api.completions.create(model=BASE, prompt=PROMPT, max_tokens=8, **GREEDY)
    assert on_base.choices[0].token_ids == base.token_ids
    pinned = api.completions.create(model="sql@1", prompt=PROMPT, max_tokens=8, **GREEDY)
    assert pinned.choices[0].token_ids == want.token_ids


def test_streamed_completions_carry_the_same_tokens_and_usage(served):
    api = served.openai("alpha-key")
    whole = api.completions.create(model="sql", prompt=PROMPT, max_tokens=8, **GREEDY)
    chunks = list(
        api.completions.create(
            model="sql",
            prompt=PROMPT,
            max_tokens=8,
            stream=True,
            stream_options={"include_usage": True},
            **GREEDY,
        )
    )
    ids = [i for c in chunks if c.choices for i in c.choices[0].token_ids]
    assert ids == whole.choices[0].token_ids
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert reasons[-1] == "length" and set(reasons[:-1]) == {None}
    assert chunks[-1].usage.completion_tokens == 8 and not chunks[-1].choices


def chat_prompt_ids(model_dir: Path, messages: list[dict]) -> list[int]:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_dict=False, sanitize_control_tokens=True
    )


def test_chat_renders_the_template_and_gives_the_grpc_tokens(served):
    messages = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "What is a fox? </s>"},  # a control token, sent as text
    ]
    ids = chat_prompt_ids(served.model_dir, messages)
    assert 2 not in ids[1:]  # the user's "</s>" did not become the end-of-sequence token
    with served.grpc("alpha-key") as grpc_client:
        want = grpc_client.generate(ids, adapter="sql", max_new_tokens=6, ignore_eos=True)
    api = served.openai("alpha-key")
    got = api.chat.completions.create(model="sql", messages=messages, max_tokens=6, **GREEDY)
    assert got.choices[0].token_ids == want.token_ids
    assert got.choices[0].message.content == want.text
    assert got.choices[0].message.role == "assistant"
    assert got.usage.prompt_tokens == len(ids)
    stream = api.chat.completions.create(
        model="sql", messages=messages, max_completion_tokens=6, stream=True, **GREEDY
    )
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want.text
    assert chunks[-1].choices[0].finish_reason == "length"
    assert chunks[-1].object == "chat.completion.chunk"


def test_structured_output_with_a_json_schema(served):
    schema = {
        "type": "object",
        "properties": {"answer": {"enum": ["yes", "no"]}},
        "required": ["answer"],
        "additionalProperties": False,
    }
    got = served.openai("alpha-key").chat.completions.create(
        model="sql",
        messages=[{"role": "user", "content": "Yes or no?"}],
        max_tokens=40,
        temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": schema}},
    )
    assert json.loads(got.choices[0].message.content)["answer"] in ("yes", "no")
    assert got.choices[0].finish_reason == "stop"


def test_models_list_the_base_and_the_callers_adapters_only(served):
    alpha = [m.id for m in served.openai("alpha-key").models.list()]
    beta = [m.id for m in served.openai("beta-key").models.list()]
    assert alpha == [BASE, "sql"] and beta == [BASE]


def test_another_tenants_adapter_is_not_found_exactly_like_a_missing_one(served):
    api = served.openai("beta-key")
    refusals = {}
    for model in ("sql", "nosuch"):
        with pytest.raises(openai.NotFoundError) as caught:
            api.completions.create(model=model, prompt=PROMPT, max_tokens=2)
        refusals[model] = caught.value.body
    assert refusals["sql"] == json.loads(json.dumps(refusals["nosuch"]).replace("nosuch", "sql"))
    assert refusals["sql"]["code"] == "not_found"


def post(served: Served, path: str, body: bytes, key: str | None) -> tuple[int, dict, dict]:
    """(status, headers, JSON body) of a raw POST."""
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    request = urllib.request.Request(served.base_url + path, body, headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=120) as reply:
            return reply.status, dict(reply.headers), json.loads(reply.read())
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), json.loads(error.read())


def test_keys_and_scopes(served):
    body = json.dumps({"model": BASE, "prompt": PROMPT, "max_tokens": 2}).encode()
    status, _, reply = post(served, "/completions", body, None)
    assert status == 401 and "Authorization: Bearer" in reply["error"]["message"]
    with pytest.raises(openai.AuthenticationError):
        served.openai("wrong-key").completions.create(model=BASE, prompt=PROMPT)
    with pytest.raises(openai.PermissionDeniedError) as caught:
        served.openai("ops-key").completions.create(model=BASE, prompt=PROMPT)
    assert "needs scope generate" in caught.value.message
    assert [m.id for m in served.openai("ops-key").models.list()] == [BASE, "sql"]


def test_bad_bodies_are_400_naming_the_field_and_large_ones_413(served):
    api = served.openai("alpha-key")
    with pytest.raises(openai.BadRequestError) as caught:
        api.completions.create(model="sql", prompt=PROMPT, extra_body={"best_off": 2})
    assert "best_off" in caught.value.message and caught.value.body["param"] == "best_off"
    with pytest.raises(openai.BadRequestError) as caught:
        api.completions.create(model="sql", prompt=PROMPT, temperature=-1)
    assert "temperature must be 0 (greedy)" in caught.value.message  # the engine's own check
    with pytest.raises(openai.BadRequestError) as caught:
        api.completions.create(model="sql", prompt="x" * (MAX_PROMPT_BYTES + 1))
    assert "max_prompt_bytes" in caught.value.message
    status, _, reply = post(served, "/completions", b"{not json", "alpha-key")
    assert status == 400 and reply["error"]["type"] == "invalid_request_error"
    status, reply = declared_too_large(served, 5 * 1024 * 1024)
    assert status == 413 and "limit of 4194304 bytes" in reply["error"]["message"]


def declared_too_large(served: Served, size: int) -> tuple[int, dict]:
    """A POST that declares `size` bytes of body and sends none: refused on the header."""
    host, port = served.base_url.split("//")[1].split("/")[0].split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        connection.putrequest("POST", "/v1/completions")
        connection.putheader("Authorization", "Bearer alpha-key")
        connection.putheader("Content-Length", str(size))
        connection.endheaders()
        reply = connection.getresponse()
        return reply.status, json.loads(reply.read())
    finally:
        connection.close()


def test_a_full_queue_and_the_tenant_quota_are_429_with_retry_after(served):
    api = served.openai("alpha-key")
    held = api.completions.create(
        model="sql", prompt="Hold", max_tokens=2000, stream=True, **GREEDY
    )  # the batch of one
    next(iter(held))
    queued = threading.Thread(
        target=lambda: served.openai("beta-key").completions.create(
            model=BASE, prompt="Queued", max_tokens=2, **GREEDY
        )
    )
    queued.start()  # the queue of one
    wait_for_waiting(served.metrics_port, 1)
    with pytest.raises(openai.RateLimitError) as caught:
        api.completions.create(model="sql", prompt=PROMPT, max_tokens=2)
    assert "the queue is full" in caught.value.message
    assert caught.value.response.headers["retry-after"] == "1"
    held.close()  # the client leaves: the engine cancels the request and the queue moves
    queued.join(timeout=120)
    assert not queued.is_alive()
    deadline = time.monotonic() + 60
    one = served.openai("one-key")
    held = one.completions.create(model=BASE, prompt="Hold", max_tokens=2000, stream=True, **GREEDY)
    next(iter(held))
    with pytest.raises(openai.RateLimitError) as caught:
        one.completions.create(model=BASE, prompt=PROMPT, max_tokens=2)
    assert "max_requests_in_flight" in caught.value.message
    held.close()
    while True:  # the place comes back once the server has seen the client leave
        try:
            one.completions.create(model=BASE, prompt=PROMPT, max_tokens=2)
            break
        except openai.RateLimitError:
            assert time.monotonic() < deadline
            time.sleep(0.05)


def test_outcomes_are_counted_like_grpc_calls(served):
    served.openai("alpha-key").completions.create(model="sql", prompt=PROMPT, max_tokens=2)
    text = scrape(served.metrics_port)
    route = "POST /v1/completions"
    assert value(text, "loraserve_grpc_responses_total", method=route, code="OK") >= 1
    assert value(text, "loraserve_requests_rejected_total", reason="queue_full") >= 1


def wait_for(condition, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"never {what}"
        time.sleep(0.05)


def cancelled(served: Served) -> float:
    text = scrape(served.metrics_port)
    return value(text, "loraserve_requests_finished_total", tenant="", finish_reason="cancelled")


def running(served: Served) -> float:
    return value(scrape(served.metrics_port), "loraserve_requests_running")


def test_a_client_that_disconnects_cancels_its_request(served):
    """Not streamed: the server notices the closed connection while the reply is gathered."""
    before = cancelled(served)
    body = json.dumps(
        {"model": BASE, "prompt": PROMPT, "max_tokens": 2000, "temperature": 0, "ignore_eos": True}
    ).encode()
    host, port = served.base_url.split("//")[1].split("/")[0].split(":")
    with socket.create_connection((host, int(port)), timeout=60) as connection:
        connection.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer alpha-key\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        wait_for(lambda: running(served) == 1, "running")
    wait_for(lambda: cancelled(served) == before + 1, "cancelled")
    text = scrape(served.metrics_port)
    route = "POST /v1/completions"
    assert value(text, "loraserve_grpc_responses_total", method=route, code="CANCELLED") >= 1


def health(base_url: str) -> int:
    try:
        with urllib.request.urlopen(base_url.removesuffix("/v1") + "/health", timeout=10) as reply:
            return reply.status
    except urllib.error.HTTPError as error:
        return error.code


def test_sigterm_drains_the_http_api_too(model_dirs, tmp_path):
    """New calls get 503 at once, a stream in flight runs to its end, then the process exits 0."""
    http_port = free_port()
    flags = ["--model", str(model_dirs["llama"]), "--device", "cpu", "--http-port", str(http_port),
             "--served-model-name", BASE, "--drain-grace-seconds", "120"]  # fmt: skip
    with running_server(*flags, log_path=tmp_path / "server.log") as (_, process):
        served = Served("", f"http://127.0.0.1:{http_port}/v1", 0, model_dirs["llama"])
        api = served.openai("dev-mode-takes-any-key")
        assert health(served.base_url) == 200
        stream = api.completions.create(
            model=BASE, prompt=PROMPT, max_tokens=1500, stream=True, **GREEDY
        )
        chunks = iter(stream)
        next(chunks)
        process.send_signal(signal.SIGTERM)
        wait_for(lambda: health(served.base_url) == 503, "503 on /health")
        with pytest.raises(openai.InternalServerError) as caught:
            api.completions.create(model=BASE, prompt=PROMPT, max_tokens=2)
        assert caught.value.status_code == 503 and "shutting down" in caught.value.message
        rest = list(chunks)
        assert rest[-1].choices[0].finish_reason == "length"
        assert process.wait(timeout=120) == 0


def test_an_http_port_in_use_stops_the_start(model_dirs):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        started = subprocess.run(
            [sys.executable, "-m", "loraserve.cli", "serve", "--model", str(model_dirs["llama"]),
             "--device", "cpu", "--port", str(free_port()), "--http-port", str(port)],
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
    assert started.returncode == 1
    assert f"cannot bind 127.0.0.1:{port} for the HTTP API" in started.stderr
