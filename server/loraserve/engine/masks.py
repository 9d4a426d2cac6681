"""The next-token masks of a step's constrained rows, filled on a helper thread while the model
runs the step's forward.

`MaskFiller.start(seqs)` takes the sequences that sample this step, before the forward. When
none is constrained it returns None at once: an unconstrained batch pays one list scan. Else
it hands their grammar states to the helper thread (which fills the bitmasks with the GIL
released, see `GrammarCompiler.fill`) and returns a `PendingMasks`; `wait()` gives the masks on
the logits' device and the rows whose grammar broke (a step over its limits). Between `start`
and `wait` only the helper thread touches those grammar states; the engine thread otherwise.

Knows nothing about sampling or requests beyond their grammar state and `ignore_eos`.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from loraserve.engine.sequence import Sequence
from loraserve.model.cpus import serial_executor
from loraserve.model.grammar import GrammarCompiler, GrammarState
from loraserve.model.sampling import AllowedTokens


@dataclass(frozen=True)
class StepMasks:
    """What sampling needs for a step's constrained rows (row numbers index the step's batch)."""

    allowed: AllowedTokens | None = None
    broken: dict[int, str] = field(default_factory=dict)  # row -> why its grammar broke


class PendingMasks:
    def __init__(
        self,
        rows: list[int],
        states: list[GrammarState],
        bitmask: torch.Tensor,
        fill: Future[None],
        device: torch.device,
    ) -> None:
        self._rows = rows
        self._states = states
        self._bitmask = bitmask  # [C, words] int32 on the CPU
        self._fill = fill
        self._device = device

    def wait(self) -> StepMasks:
        self._fill.result()
        broken = {row: why for row, state in zip(self._rows, self._states) if (why := state.error)}
        allowed = AllowedTokens(
            torch.tensor(self._rows, dtype=torch.int64, device=self._device),
            self._bitmask.to(self._device, non_blocking=True),
        )
        return StepMasks(allowed, broken)


class MaskFiller:
    """One reusable bitmask buffer of `max_rows` rows (the batch size bounds a step's rows)."""

    def __init__(self, compiler: GrammarCompiler, max_rows: int, device: torch.device) -> None:
        self._compiler = compiler
        self._device = device
        pinned = device.type == "cuda"
        # [max_rows, words] int32; reused each step: a step's masks are on the device (or
        # sampled from) before the next step fills it again
        self._buffer = torch.zeros((max_rows, compiler.words), dtype=torch.int32, pin_memory=pinned)
        self._thread = serial_executor(1, "loraserve-masks")

    def start(self, seqs: Seq[Sequence]) -> PendingMasks | None:
        rows = [row for row, seq in enumerate(seqs) if seq.grammar is not None]
        if not rows:
            return None
        states = [state for row in rows if (state := seqs[row].grammar) is not None]
        block_eos = [seqs[row].params.ignore_eos for row in rows]
        bitmask = self._buffer[: len(rows)]
        fill = self._thread.submit(self._compiler.fill, states, bitmask, block_eos)
        return PendingMasks(rows, states, bitmask, fill, self._device)
