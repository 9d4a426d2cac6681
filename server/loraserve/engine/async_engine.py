"""The asyncio face of the engine: a background thread runs `EngineCore.step` in a loop.

`await generate(request)` validates and tokenizes the request on a worker thread (so the event
loop never waits on a tokenizer), raising for bad input, then returns an async iterator of
`TokenEvent`s ending with one `FinalEvent`. Closing the iterator early (or cancelling the task
that reads it, even while the request is still being prepared) cancels the request: the engine
retires it and frees its KV at the next step. The loop blocks on its inbox when idle: no
polling.

Knows nothing about gRPC or tokenization; all model work happens on the engine thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import AsyncGenerator, Callable

from loraserve.engine.core import EngineCore
from loraserve.engine.sequence import Event, Sequence
from loraserve.types import EngineDeadError, FinalEvent, GenerateRequest, TokenEvent

log = logging.getLogger(__name__)


def _stop() -> None:
    """The inbox task `shutdown` sends: the loop ends when it comes to it."""


class AsyncEngine:
    def __init__(self, core: EngineCore) -> None:
        self.core = core
        self._inbox = core.inbox
        self._thread = threading.Thread(target=self._run, name="loraserve-engine", daemon=True)
        self._error: BaseException | None = None
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    async def generate(
        self, request: GenerateRequest
    ) -> AsyncGenerator[TokenEvent | FinalEvent, None]:
        """Submit `request`; raises LoraServeError subclasses for bad input before any event."""
        if not self.alive:
            raise EngineDeadError(f"the engine stopped: {self._error!r}")
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()

        def emit(event: Event) -> None:
            # A caller whose event loop has closed is gone: its events go nowhere, and no
            # other request may fail for it.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(events.put_nowait, event)

        preparing = asyncio.ensure_future(asyncio.to_thread(self.core.make_sequence, request, emit))
        try:
            seq = await asyncio.shield(preparing)
        except asyncio.CancelledError:
            preparing.add_done_callback(self._abandon)
            raise
        self._inbox.put(lambda: self.core.add(seq))
        return self._events(seq, events)

    def _abandon(self, preparing: asyncio.Future) -> None:
        """The caller left while its request was being prepared: hand the engine the sequence
        already cancelled, so what it holds in the queue's bounds is released."""
        if preparing.cancelled() or preparing.exception() is not None:
            return
        seq = preparing.result()
        seq.cancelled = True
        self._inbox.put(lambda: self.core.add(seq))

    async def _events(
        self, seq: Sequence, events: asyncio.Queue[Event]
    ) -> AsyncGenerator[TokenEvent | FinalEvent, None]:
        done = False
        try:
            while True:
                event = await events.get()
                if isinstance(event, Exception):
                    done = True
                    raise event
                if isinstance(event, FinalEvent):
                    done = True
                yield event
                if done:
                    return
        finally:
            if not done:
                self._inbox.put(lambda: self.core.cancel(seq.request_id))

    def call(self, fn: Callable[[], object]) -> None:
        """Run `fn` on the engine thread between two steps."""
        self._inbox.put(fn)

    def join(self) -> None:
        """Block until the engine thread ends (after `shutdown`, or if the loop died)."""
        self._thread.join()

    def shutdown(self) -> None:
        """Stop the loop after the current step; pending requests are not served."""
        self._inbox.put(_stop)
        self._thread.join()

    def _run(self) -> None:
        try:
            progressed = False
            while True:
                # Idle, or every waiting request waits on an adapter load: sleep until the
                # inbox has a request, a cancel or a finished load.
                block = not (self.core.has_work() and progressed)
                for task in self._inbox.take(block):
                    if task is _stop:
                        return
                    self._run_task(task)
                progressed = self.core.has_work() and self.core.step()
        except BaseException as error:  # the loop itself broke: report, never hang callers
            self._error = error
            log.exception("engine loop died")
            self.core.fail_all(EngineDeadError(f"the engine stopped: {error!r}"))
            raise

    @staticmethod
    def _run_task(task: Callable[[], object]) -> None:
        try:
            task()
        except Exception:
            log.exception("engine task failed")
