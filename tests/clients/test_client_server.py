"""The client and its commands against one real `loraserve serve` process: sync, async and
streamed results agree, closing a stream cancels it, server errors arrive typed, health and
info, constraints, top logprobs and logit bias, and `python -m loraserve_client` output and
exit codes."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator

import jsonschema
import pytest
from tests.api.server_process import running_server

from loraserve_client import (
    AsyncClient,
    Client,
    DeadlineExceeded,
    Finished,
    InvalidArgument,
    NotFound,
    TokenChunk,
)
from loraserve_client.cli import main

pytestmark = pytest.mark.slow  # a real server process

ADAPTER = "r4-attn"
PROMPT = "The quick brown fox"
MAX_NEW = 8


@pytest.fixture(scope="module")
def server_address(model_dirs, adapter_dirs, tmp_path_factory) -> Iterator[str]:
    """The one server of this module: the tiny llama model and one start-up adapter."""
    flags = ["--model", str(model_dirs["llama"]), "--compute-dtype", "fp32", "--device", "cpu"]
    flags += ["--adapter", f"{ADAPTER}={adapter_dirs['llama'][ADAPTER]}"]
    log = tmp_path_factory.mktemp("server") / "server.log"
    with running_server(*flags, log_path=log) as (address, _):
        yield address


@pytest.fixture(scope="module")
def client(server_address) -> Iterator[Client]:
    with Client(server_address, api_key="key", timeout=30) as client:
        yield client


@pytest.mark.parametrize(
    ("prompt", "adapter"), [(PROMPT, ADAPTER), (PROMPT, None), ([5, 17, 42, 99], ADAPTER)]
)
async def test_sync_async_and_streamed_results_agree(client, server_address, prompt, adapter):
    options = {"adapter": adapter, "max_new_tokens": MAX_NEW, "logprobs": True}
    result = client.generate(prompt, **options)
    with client.generate_stream(prompt, **options) as stream:
        events = list(stream)
    async with AsyncClient(server_address, api_key="key", timeout=30) as async_client:
        async_result = await async_client.generate(prompt, **options)
        async_events = [event async for event in async_client.generate_stream(prompt, **options)]

    assert async_result.token_ids == result.token_ids and async_result.text == result.text
    assert async_result.logprobs == pytest.approx(result.logprobs, abs=1e-4)
    *chunks, final = events
    assert all(isinstance(c, TokenChunk) for c in chunks) and isinstance(final, Finished)
    assert [c.token_id for c in chunks] == result.token_ids
    assert result.text.startswith("".join(c.text for c in chunks))
    assert [c.logprob for c in chunks] == pytest.approx(result.logprobs, abs=1e-4)
    assert final == Finished(result.finish_reason, result.prompt_tokens, result.completion_tokens)
    assert [(e.token_id if isinstance(e, TokenChunk) else e) for e in async_events] == [
        *result.token_ids,
        final,
    ]
    assert result.finish_reason in ("length", "eos")
    assert result.completion_tokens == len(result.token_ids) == len(result.logprobs)
    assert result.prompt_tokens > 0
    if isinstance(prompt, list):
        assert result.prompt_tokens == len(prompt)


def test_closing_a_stream_cancels_it_and_the_server_keeps_serving(client):
    with client.generate_stream(PROMPT, max_new_tokens=1000, ignore_eos=True) as stream:
        first = next(stream)
    assert isinstance(first, TokenChunk)
    assert list(stream) == []
    stream = client.generate_stream(PROMPT, max_new_tokens=1000, ignore_eos=True)
    next(stream)
    stream.close()
    assert list(stream) == []
    assert client.generate(PROMPT, max_new_tokens=MAX_NEW).completion_tokens == MAX_NEW
    assert client.health() == "SERVING"


async def test_async_stream_close_cancels_it(server_address):
    async with AsyncClient(server_address) as client:
        async with client.generate_stream(PROMPT, max_new_tokens=1000, ignore_eos=True) as stream:
            async for event in stream:
                assert isinstance(event, TokenChunk)
                break
        assert [event async for event in stream] == []
        stream = client.generate_stream(PROMPT, max_new_tokens=1000, ignore_eos=True)
        await stream.__anext__()
        await stream.aclose()
        assert [event async for event in stream] == []
        result = await client.generate(PROMPT, adapter=ADAPTER, max_new_tokens=MAX_NEW)
        assert result.completion_tokens == MAX_NEW


@pytest.mark.parametrize(
    ("arguments", "error", "words"),
    [
        ({"prompt": PROMPT, "adapter": "nope"}, NotFound, "'nope'"),
        ({"prompt": ""}, InvalidArgument, "prompt is empty"),
        ({"prompt": PROMPT, "temperature": -1.0}, InvalidArgument, "temperature"),
        (
            {"prompt": PROMPT, "max_new_tokens": 1000, "ignore_eos": True, "timeout": 0.3},
            DeadlineExceeded,
            "",
        ),
    ],
)
async def test_server_errors_arrive_typed(client, server_address, arguments, error, words):
    with pytest.raises(error) as caught:
        client.generate(**arguments)
    assert caught.value.code == error.code and words in caught.value.details
    with pytest.raises(error), client.generate_stream(**arguments) as stream:
        list(stream)
    async with AsyncClient(server_address) as async_client:
        with pytest.raises(error):
            await async_client.generate(**arguments)
        with pytest.raises(error):
            [event async for event in async_client.generate_stream(**arguments)]


async def test_health_and_server_info(client, server_address):
    assert client.health() == "SERVING"
    assert client.health("loraserve.v1.GenerationService") == "SERVING"
    with pytest.raises(NotFound):
        client.health("no.such.Service")
    info = client.server_info()
    assert info["quantization"] == "nf4" and info["device"] == "cpu"
    assert info["max_context"] > 0 and info["default_max_new_tokens"] > 0
    assert all(type(value) in (str, int, bool) for value in info.values())
    assert type(info["batch_invariant"]) is bool
    async with AsyncClient(server_address) as async_client:
        assert await async_client.health() == "SERVING"
        assert await async_client.server_info() == info


def run_cli(client_env, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "loraserve_client", *argv],
        capture_output=True,
        text=True,
        env=client_env,
        timeout=60,
    )


def test_cli_generate_json_and_errors_in_a_subprocess(client, server_address, client_env):
    expected = client.generate(PROMPT, adapter=ADAPTER, max_new_tokens=MAX_NEW)
    argv = ("generate", PROMPT, "--adapter", ADAPTER, "--max-new-tokens", str(MAX_NEW))
    done = run_cli(client_env, *argv, "--json", "--server", server_address)
    assert done.returncode == 0, done.stderr
    reply = json.loads(done.stdout)
    assert reply["token_ids"] == expected.token_ids
    assert reply["finish_reason"] == expected.finish_reason
    assert reply["text"] == expected.text

    failed = run_cli(client_env, *argv[:2], "--adapter", "nope", "--server", server_address)
    assert failed.returncode == 1 and failed.stdout == ""
    assert failed.stderr.startswith("error: NOT_FOUND: ") and "'nope'" in failed.stderr

    health = run_cli(dict(client_env, LORASERVE_SERVER=server_address), "health")
    assert (health.returncode, health.stdout) == (0, "SERVING\n")


def test_cli_human_and_streamed_output(client, server_address, capsys):
    expected = client.generate(PROMPT, max_new_tokens=MAX_NEW)
    common = ["--max-new-tokens", str(MAX_NEW), "--server", server_address]
    assert main(["generate", PROMPT, *common]) == 0
    assert capsys.readouterr().out == expected.text + "\n"

    assert main(["generate", PROMPT, *common, "--stream"]) == 0
    streamed = capsys.readouterr().out
    assert streamed.endswith("\n") and expected.text.startswith(streamed[:-1])

    assert main(["generate", PROMPT, *common, "--stream", "--json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["token"]["token_id"] for line in lines[:-1]] == expected.token_ids
    assert lines[-1]["final"]["finish_reason"] == expected.finish_reason

    assert main(["info", "--json", "--server", server_address]) == 0
    assert json.loads(capsys.readouterr().out) == client.server_info()
    assert main(["info", "--server", server_address]) == 0
    assert "quantization:" in capsys.readouterr().out

    assert main(["generate", "", "--server", server_address]) == 1
    assert capsys.readouterr().err.startswith("error: INVALID_ARGUMENT: ")


SCHEMA = {
    "type": "object",
    "properties": {
        "answer": {"enum": ["yes", "no"]},
        "confidence": {"type": "integer", "minimum": 0, "maximum": 100},
    },
    "required": ["answer", "confidence"],
    "additionalProperties": False,
}


async def test_constraints_top_logprobs_and_logit_bias(client, server_address):
    result = client.generate(
        PROMPT, adapter=ADAPTER, max_new_tokens=64, json_schema=SCHEMA, top_logprobs=3
    )
    assert result.finish_reason == "eos"
    jsonschema.validate(json.loads(result.text), SCHEMA)
    assert len(result.logprobs) == len(result.top_logprobs) == len(result.token_ids)
    for chosen, top in zip(result.logprobs, result.top_logprobs):
        assert len(top) == 3 and top[0].logprob >= top[1].logprob >= top[2].logprob
        assert chosen <= top[0].logprob + 1e-6 and all(t.text for t in top)

    choices = ["red", "green", "blue"]
    with client.generate_stream(PROMPT, choice=choices, top_logprobs=2, temperature=1.0) as s:
        events = list(s)
    *tokens, final = events
    assert isinstance(final, Finished) and final.finish_reason == "eos"
    assert "".join(t.text for t in tokens) in choices
    assert all(len(t.top_logprobs) == 2 and t.logprob is not None for t in tokens)

    async with AsyncClient(server_address, timeout=30) as async_client:
        matched = await async_client.generate(PROMPT, regex="[a-z]{3}-[0-9]{2}", max_new_tokens=32)
    assert matched.finish_reason == "eos" and re.fullmatch("[a-z]{3}-[0-9]{2}", matched.text)

    forced = client.generate(PROMPT, max_new_tokens=4, ignore_eos=True, logit_bias={42: 100.0})
    assert forced.token_ids == [42] * 4

    with pytest.raises(ValueError, match="at most one constraint"):
        client.generate(PROMPT, regex="a", choice=["a"])
    with pytest.raises(InvalidArgument, match="unclosed group"):
        client.generate(PROMPT, regex="(")
    with pytest.raises(InvalidArgument, match="top_logprobs"):
        client.generate(PROMPT, top_logprobs=21)


def test_cli_constraint_and_logprob_flags(client, server_address, tmp_path, capsys):
    schema_file = tmp_path / "schema.json"
    schema_file.write_text(json.dumps(SCHEMA))
    common = ["--server", server_address, "--max-new-tokens", "64"]
    argv = ["generate", PROMPT, *common, "--json-schema", str(schema_file), "--top-logprobs", "2"]
    assert main([*argv, "--json"]) == 0
    reply = json.loads(capsys.readouterr().out)
    jsonschema.validate(json.loads(reply["text"]), SCHEMA)
    assert reply["finish_reason"] == "eos"
    assert [len(top) for top in reply["top_logprobs"]] == [2] * len(reply["token_ids"])

    assert main(argv) == 0
    text, *lines = capsys.readouterr().out.splitlines()
    assert text == reply["text"] and len(lines) == len(reply["token_ids"])
    assert lines[0].split()[0] == str(reply["token_ids"][0])

    grammar_file = tmp_path / "grammar.gbnf"
    grammar_file.write_text('root ::= "(" [0-9] ")"\n')
    assert main(["generate", PROMPT, *common, "--grammar", str(grammar_file)]) == 0
    assert re.fullmatch(r"\([0-9]\)\n", capsys.readouterr().out)
    assert main(["generate", PROMPT, *common, "--choice", "up", "down"]) == 0
    assert capsys.readouterr().out in ("up\n", "down\n")
    biased = ["generate", PROMPT, *common, "--ignore-eos", "--logit-bias", "42=100", "--json"]
    assert main(biased) == 0
    assert set(json.loads(capsys.readouterr().out)["token_ids"]) == {42}

    for bad in (["--logit-bias", "42"], ["--regex", "a", "--choice", "b"], ["--grammar", "/no"]):
        with pytest.raises(SystemExit) as caught:
            main(["generate", PROMPT, *bad])
        assert caught.value.code == 2
    capsys.readouterr()
