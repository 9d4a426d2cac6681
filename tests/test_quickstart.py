"""The README as a newcomer follows it: its commands exactly as written, against the demo.

The serve command (the third line of the README's first block) and the quickstart's client
commands run from the repository root through a shell, as typed. Only the environment differs,
moving the server to a free port and a fresh store (LORASERVE_PORT, LORASERVE_ADAPTER_DIR,
LORASERVE_SERVER), so the commands themselves are untouched. Each documented output must be
printed exactly (but for the space a completion starts with). Then each demo behaviour must
hold on prompts training never saw, all of them sent at once so that they share batches.
"""

from __future__ import annotations

import os
import random
import re
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

import pytest
from tests.api.server_process import SERVING, free_port, health_status

from loraserve.demo import demo_model
from loraserve.demo.language import BEHAVIOURS, expected_words, sample_words
from loraserve_client import Client, GenerateOptions

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text()
PROMPTS_PER_BEHAVIOUR = 8


@dataclass(frozen=True)
class Example:
    command: str
    output: str


def code_blocks(text: str) -> list[tuple[str, str]]:
    """(language, body) of each fenced block, in order."""
    return re.findall(r"^```(\w*)\n(.*?)^```", text, flags=re.MULTILINE | re.DOTALL)


def quickstart_examples() -> list[Example]:
    """Each bash block of the quickstart with the text block that follows it."""
    section = README.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    blocks = code_blocks(section)
    return [
        Example(body.strip(), following.rstrip("\n"))
        for (language, body), (next_language, following) in pairwise(blocks)
        if language == "bash" and next_language == "text"
    ]


@pytest.fixture(scope="module")
def demo_server(tmp_path_factory):
    """The README's serve command, running; yields its address."""
    demo_model()  # trained here first (once per cache), so that a slow build reads as one
    serve = code_blocks(README)[0][1].strip().splitlines()[2]
    assert serve == ".venv/bin/loraserve serve"
    port = free_port()
    env = dict(os.environ, LORASERVE_PORT=str(port),
               LORASERVE_ADAPTER_DIR=str(tmp_path_factory.mktemp("store")))  # fmt: skip
    log_path = tmp_path_factory.mktemp("log") / "serve.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(["bash", "-c", serve], cwd=REPO, env=env, stdout=log,
                                   stderr=subprocess.STDOUT)  # fmt: skip
    address = f"127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while health_status(address) != SERVING:
            assert process.poll() is None, f"server exited early:\n{log_path.read_text()}"
            assert time.monotonic() < deadline, f"server not SERVING:\n{log_path.read_text()}"
            time.sleep(0.2)
        yield address
    finally:
        process.kill()
        process.wait()


def test_the_quickstart_prints_what_the_readme_shows(demo_server):
    examples = quickstart_examples()
    assert len(examples) >= 2 and "--each-adapter" in examples[0].command
    env = dict(os.environ, LORASERVE_SERVER=demo_server)
    for example in examples:
        done = subprocess.run(["bash", "-c", example.command], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=120)  # fmt: skip
        assert done.returncode == 0, done.stderr
        # A completion continues its prompt, so its text starts with the space between words.
        assert done.stdout.strip() == example.output, example.command


def test_each_behaviour_holds_on_unseen_prompts_in_one_mixed_batch(demo_server):
    rng = random.Random(2026)
    cases = [
        (behaviour, sample_words(rng, behaviour, held_out=True))
        for behaviour in BEHAVIOURS
        for _ in range(PROMPTS_PER_BEHAVIOUR)
    ]
    rng.shuffle(cases)

    def answer(case: tuple[str, list[str]]) -> str:
        behaviour, words = case
        adapter = None if behaviour == "base" else behaviour
        return client.generate(" ".join(words), GenerateOptions(adapter=adapter)).text.strip()

    with Client(demo_server) as client, ThreadPoolExecutor(len(cases)) as pool:
        answers = list(pool.map(answer, cases))
    wrong = [
        (behaviour, words, got)
        for (behaviour, words), got in zip(cases, answers)
        if got != " ".join(expected_words(behaviour, words))
    ]
    assert not wrong
