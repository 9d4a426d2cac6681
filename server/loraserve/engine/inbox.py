"""The engine thread's inbox: tasks from other threads, and wake-ups that carry no task.

`put(task)` queues a callable to run on the engine thread between two steps; `wake()` (the
adapter loader, when a load finishes) only ends a wait, and wake-ups that arrive while nobody
waits count as one. `take(block)` returns every queued task at once, after waiting for a task
or a wake-up when `block` is true.

Knows nothing about what the tasks do or about the engine's steps.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

Task = Callable[[], object]


class Inbox:
    def __init__(self) -> None:
        self._tasks: list[Task] = []
        self._woken = False
        self._changed = threading.Condition()

    def put(self, task: Task) -> None:
        with self._changed:
            self._tasks.append(task)
            self._changed.notify()

    def wake(self) -> None:
        with self._changed:
            self._woken = True
            self._changed.notify()

    def take(self, block: bool) -> list[Task]:
        """The queued tasks, oldest first; when `block`, first wait for a task or a wake-up."""
        with self._changed:
            if block:
                self._changed.wait_for(lambda: self._tasks or self._woken)
            tasks, self._tasks, self._woken = self._tasks, [], False
        return tasks
