"""The background loader: one thread that brings adapter weights into the host and device tiers.

Jobs run one at a time in submission order, so the decode loop never waits on a disk read or a
copy into slot buffers. `on_done` runs after every job (the engine loop sleeps until then when
every waiting request waits on a load); `wait_idle` blocks until every submitted job finished.
On CUDA, jobs get a side stream for their copies.

Knows nothing about keys or slot bookkeeping: a job is a function of the stream.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable

import torch

from loraserve.adapters.peft_format import LoraWeights
from loraserve.model.cpus import serial_thread
from loraserve.model.lora import LoraLayer
from loraserve.model.slot_terms import SlotCopies

log = logging.getLogger(__name__)

Job = Callable[["torch.cuda.Stream | None"], None]


def write_slot(layers: dict[str, LoraLayer], index: int, weights: LoraWeights) -> None:
    """Copy resolved `weights` (see `AdapterManager.prepare`) into slot `index` of every layer,
    in one batched copy; layers it does not target are zeroed."""
    copies = SlotCopies()
    for name, layer in layers.items():
        module = weights.modules.get(name)
        if module is None:
            layer.clear_slot(index)
        elif not module.resolved:
            raise ValueError(f"{name}: the adapter's terms were not resolved against the base")
        else:
            layer.set_slot(
                index, module.a, module.b, module.scale, module.shift, copies,
                lora_scale=module.lora_scale, stored_half=module.stored_half,
                unscaled=module.unscaled,
            )  # fmt: skip
    copies.run()


class Loader:
    def __init__(self, device: torch.device, on_done: Callable[[], None] | None = None) -> None:
        self._device = device
        self._on_done = on_done
        self._jobs: queue.SimpleQueue[Job] = queue.SimpleQueue()
        self._pending = 0
        self._idle = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="loraserve-loader", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> None:
        with self._idle:
            self._pending += 1
        self._jobs.put(job)

    def wait_idle(self, timeout: float) -> bool:
        """Block until every submitted job has finished; False on timeout."""
        with self._idle:
            return self._idle.wait_for(lambda: self._pending == 0, timeout)

    def _run(self) -> None:
        stream = torch.cuda.Stream(self._device) if self._device.type == "cuda" else None
        serial_thread()  # a load's ops run here, never on a team beside the engine's
        while True:
            job = self._jobs.get()
            try:
                job(stream)
            except Exception:  # a job reports its own failures; this one escaped it
                log.exception("adapter load job failed")
            finally:
                with self._idle:
                    self._pending -= 1
                    self._idle.notify_all()
                if self._on_done is not None:
                    self._on_done()
