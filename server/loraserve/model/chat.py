"""Chat prompts: messages rendered by the tokenizer's own chat template, then tokenized.

The template is the model's (its tokenizer files); it runs in transformers' sandboxed Jinja
environment. Control tokens a caller writes inside a message (an end-of-turn marker, a role
header) are encoded as plain text, so only the template itself can open or close a turn.

Knows nothing about requests, tenants or limits: the engine's intake checks those first.
"""

from __future__ import annotations

from collections.abc import Sequence

from jinja2.exceptions import TemplateError
from transformers import PreTrainedTokenizerBase

from loraserve.types import ChatTurn, InvalidRequestError, clip

NO_TEMPLATE = (
    "this model's tokenizer has no chat template, so chat messages cannot be turned into a "
    "prompt; send a formatted prompt to /v1/completions (or GenerationInput.text) instead"
)


def has_chat_template(tokenizer: PreTrainedTokenizerBase) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def chat_prompt_ids(tokenizer: PreTrainedTokenizerBase, messages: Sequence[ChatTurn]) -> list[int]:
    """The token ids of `messages` as the template renders them, ready for the assistant's
    reply (the generation prompt added; no special tokens beyond the template's own).

    Raises InvalidRequestError when there is no template or it refuses the conversation
    (many templates insist on alternating roles)."""
    if not has_chat_template(tokenizer):
        raise InvalidRequestError(NO_TEMPLATE)
    conversation = [{"role": m.role, "content": m.content} for m in messages]
    try:
        ids = tokenizer.apply_chat_template(
            conversation,
            add_generation_prompt=True,
            tokenize=True,
            return_dict=False,
            sanitize_control_tokens=True,
        )
    except TemplateError as error:
        raise InvalidRequestError(
            f"the model's chat template refused these messages: {clip(str(error), 300)}"
        ) from None
    if not isinstance(ids, list):
        raise TypeError("apply_chat_template did not return a list of token ids")
    return [i for i in ids if isinstance(i, int)]
