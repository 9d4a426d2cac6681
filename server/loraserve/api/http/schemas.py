"""The request bodies of the OpenAI-compatible API: closed pydantic schemas, checked before
anything else reads them.

Every field the OpenAI API defines for completions and chat completions that this server can
honour is here, plus vLLM's extensions (`top_k`, `repetition_penalty`, `ignore_eos`,
`return_token_ids`); any other field is refused by name, so a client never believes a setting
took effect when it did not. Values are range-checked once, by the engine, not here.

Knows nothing about the engine or HTTP: shapes only.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_NAME_CHARS = 256  # of a `model`, or a json_schema's name


class Closed(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class StreamOptions(Closed):
    include_usage: bool = False


class JsonSchemaFormat(Closed):
    name: str = Field("response", max_length=MAX_NAME_CHARS)
    description: str | None = None
    json_schema: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None


class ResponseFormat(Closed):
    """`json_object`: any JSON object; `json_schema`: JSON valid against its schema."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class GenerationBody(Closed):
    """What completions and chat completions share."""

    model: str = Field(max_length=MAX_NAME_CHARS)
    max_tokens: int | None = None
    temperature: float = 1.0  # as OpenAI: sampled unless the caller asks for 0 (greedy)
    top_p: float = 1.0
    n: int = 1
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    logit_bias: dict[str, float] | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    response_format: ResponseFormat | None = None
    user: str | None = Field(None, max_length=MAX_NAME_CHARS)  # accepted, not used
    # vLLM's extensions; with the official client, pass them in `extra_body`.
    top_k: int = 0
    repetition_penalty: float = 1.0
    ignore_eos: bool = False
    return_token_ids: bool = False


class CompletionBody(GenerationBody):
    prompt: str | list[int]
    logprobs: int | None = None  # this many alternatives per token (0: the chosen token's only)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None


class TextPart(Closed):
    type: Literal["text"]
    text: str


class ChatMessage(Closed):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = Field(None, max_length=MAX_NAME_CHARS)

    @property
    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatBody(GenerationBody):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
