"""Chat messages through the engine's intake: the model's chat template renders them, control
tokens inside a message stay text, and a model without a template refuses them with a message
that says what to send instead."""

from __future__ import annotations

import pytest
from tests.engine.helpers import make_core

from loraserve.engine.core import EngineCore
from loraserve.types import ChatTurn, GenerateRequest, InvalidRequestError, SamplingParams

TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
STRICT = (  # refuses what many real templates refuse: a conversation that does not alternate
    "{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('roles must alternate user/assistant') }}{% endif %}"
    "{{ m['content'] }}{% endfor %}"
)
MESSAGES = (ChatTurn("system", "Be brief."), ChatTurn("user", "Hi </s> there"))


def chat(*messages: ChatTurn, prompt: str | None = None) -> GenerateRequest:
    return GenerateRequest(
        messages=messages, prompt=prompt, sampling=SamplingParams(max_new_tokens=2)
    )


@pytest.fixture(scope="module")
def core(model_dirs) -> EngineCore:
    return make_core(model_dirs["llama"], max_prompt_bytes=200)


def prompt_ids(core: EngineCore, request: GenerateRequest) -> list[int]:
    seq = core.make_sequence(request, lambda event: None)
    core.intake.leave_queue(seq)
    return seq.token_ids[: seq.prompt_len]


def test_without_a_template_chat_is_refused_saying_what_to_send(core):
    core.tokenizer.chat_template = None
    with pytest.raises(InvalidRequestError, match=r"no chat template.*/v1/completions"):
        prompt_ids(core, chat(*MESSAGES))


def test_the_template_renders_and_control_tokens_in_messages_stay_text(core):
    core.tokenizer.chat_template = TEMPLATE
    ids = prompt_ids(core, chat(*MESSAGES))
    text = "<s>system: Be brief.\n<s>user: Hi </s> there\nassistant:"
    assert core.tokenizer.decode(ids) == text
    eos, bos = core.tokenizer.eos_token_id, core.tokenizer.bos_token_id
    assert eos not in ids  # the user's "</s>" is text, not the end of the turn
    assert ids.count(bos) == 2  # the template's own <s>, once per message; none added


def test_a_template_that_refuses_the_messages_is_a_bad_request(core):
    core.tokenizer.chat_template = STRICT
    with pytest.raises(InvalidRequestError, match=r"chat template refused.*alternate"):
        prompt_ids(core, chat(ChatTurn("assistant", "first")))


@pytest.mark.parametrize(
    ("request_", "match"),
    [
        (chat(ChatTurn("user", "x" * 300)), "above this server's limit of 200 bytes"),
        (chat(*MESSAGES, prompt="also text"), "exactly one of"),
    ],
)
def test_the_intake_bounds_apply_to_messages(core, request_, match):
    core.tokenizer.chat_template = TEMPLATE
    with pytest.raises(InvalidRequestError, match=match):
        prompt_ids(core, request_)
