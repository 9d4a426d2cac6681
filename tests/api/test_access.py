"""`observed` counts a generation call by the status its handler ended with and writes one
access line: a stream grpc closes after its final event (the client hung up having read it) is
OK, not UNKNOWN; closed or cancelled before it, CANCELLED; past its deadline,
DEADLINE_EXCEEDED; aborted, the abort's code."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import grpc
import pytest

from loraserve.api.access import observed
from loraserve.metrics import Metrics
from loraserve.types import FinalEvent, FinishReason

FINAL = FinalEvent(FinishReason.LENGTH, prompt_tokens=5, completion_tokens=2)


class Context:
    """The two things `observed` asks a grpc servicer context."""

    def __init__(self, remaining: float | None = None, code: grpc.StatusCode | None = None):
        self.remaining = remaining
        self._code = code

    def time_remaining(self) -> float | None:
        return self.remaining

    def code(self) -> grpc.StatusCode | None:
        return self._code


async def stream(metrics: Metrics, context: Context) -> AsyncIterator[str]:
    """A GenerateStream handler's shape: two tokens, then the final event."""
    async with observed(metrics, context, "GenerateStream") as record:  # type: ignore[arg-type]
        record.named("acme", "sql")
        for _ in range(2):
            record.token()
            yield "token"
        record.final(FINAL)
        yield "final"


def counted(metrics: Metrics) -> dict[str, float]:
    return {
        sample.labels["code"]: sample.value
        for family in metrics.registry.collect()
        if family.name == "loraserve_grpc_responses"
        for sample in family.samples
        if sample.name.endswith("_total") and sample.value
    }


async def run(metrics: Metrics, context: Context, read: int, end: str) -> None:
    """Read `read` messages, then end the call as grpc would: "close" (the generator closed,
    GeneratorExit), "cancel" (CancelledError at the yield) or "finish" (read to the end)."""
    handler = stream(metrics, context)
    for _ in range(read):
        await handler.__anext__()
    if end == "close":
        await handler.aclose()
    elif end == "cancel":
        with pytest.raises(asyncio.CancelledError):
            await handler.athrow(asyncio.CancelledError())
    else:
        assert [m async for m in handler] == []


@pytest.mark.parametrize(
    ("read", "end", "context", "code"),
    [
        (3, "finish", Context(), "OK"),
        (3, "close", Context(), "OK"),  # the CLI's race: it exits having read the final event
        (3, "cancel", Context(), "OK"),
        (1, "close", Context(), "CANCELLED"),
        (1, "cancel", Context(), "CANCELLED"),
        (1, "cancel", Context(remaining=0.0), "DEADLINE_EXCEEDED"),
    ],
)
async def test_a_stream_is_counted_by_how_its_handler_ended(read, end, context, code):
    metrics = Metrics()
    await run(metrics, context, read, end)
    assert counted(metrics) == {code: 1.0}


async def test_an_abort_counts_its_code_and_the_access_line_says_everything(caplog):
    metrics = Metrics()
    context = Context(code=grpc.StatusCode.INVALID_ARGUMENT)
    caplog.set_level(logging.INFO, logger="loraserve.access")
    with pytest.raises(RuntimeError):
        async with observed(metrics, context, "Generate") as record:  # type: ignore[arg-type]
            record.named("acme", "bad\nname")
            raise RuntimeError("aborted")
    await run(metrics, Context(), 3, "close")
    assert counted(metrics) == {"INVALID_ARGUMENT": 1.0, "OK": 1.0}
    refused, streamed = (r.fields for r in caplog.records)  # type: ignore[attr-defined]
    assert refused["status"] == "INVALID_ARGUMENT" and refused["adapter"] == "bad\\nname"
    assert refused["ttft_s"] is None and refused["completion_tokens"] == 0
    assert streamed["status"] == "OK" and streamed["tenant"] == "acme"
    assert (streamed["prompt_tokens"], streamed["completion_tokens"]) == (5, 2)
    assert 0 <= streamed["ttft_s"] <= streamed["duration_s"]
