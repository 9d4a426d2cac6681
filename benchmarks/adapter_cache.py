"""The adapter-cache parts of the multi-LoRA benchmark: a Zipf workload over many adapters, and
the cold-load latency from disk to a ready device slot.

Zipf: `ZIPF_ADAPTERS` adapters are registered (each name its own cache key; their weights cycle
through the benchmark's distinct adapter directories, so the disk holds few files while every
tier sees 1,000 different adapters), requests draw their adapter with probability ~ 1 / rank,
the engine has `ZIPF_SLOTS` device slots and a host budget smaller than all the adapters.

Cold load: an adapter neither in host RAM nor in a slot is reserved, and the time until its
slot is ready is taken; its files are in the OS page cache, as on a warm server. The DoRA case
(`dora_cold_load_ms`) takes the same time for a DoRA adapter, whose load also dequantizes each
targeted base projection once to compute its weight norms.

Knows nothing about the other configurations; adapters are written by `common`.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from common import prepare_lora_adapters
from loraserve.adapters.manager import Admission
from loraserve.adapters.peft_format import read_peft_adapter
from loraserve.config import EngineConfig
from loraserve.engine.core import EngineCore
from loraserve.model.loading import DTYPES, load_base_model, lora_target_shapes

ZIPF_ADAPTERS = 1000
ZIPF_SLOTS = 32
ZIPF_HOST_FRACTION = 0.25  # the host tier holds a quarter of all the adapters
COLD_LOADS = 30


def zipf_choices(count: int, names: list[str], seed: int, alpha: float = 1.0) -> list[str]:
    """`count` names drawn with P(i-th name) proportional to 1 / (i + 1) ** alpha."""
    weights = torch.tensor([1.0 / (i + 1) ** alpha for i in range(len(names))])
    gen = torch.Generator().manual_seed(seed)
    return [names[i] for i in torch.multinomial(weights, count, True, generator=gen).tolist()]


def build_zipf_engine(engine_config: EngineConfig, adapter_dirs: list[Path]) -> EngineCore:
    """An engine with ZIPF_ADAPTERS registered adapters, ZIPF_SLOTS slots and a host tier
    smaller than them all. Adapter i is registered as `zipf-i`."""
    weights = read_peft_adapter(
        adapter_dirs[0],
        lora_target_shapes(engine_config.model),
        engine_config.max_rank,
        DTYPES[engine_config.compute_dtype],
    )
    config = engine_config.model_copy(
        update=dict(
            device_slots=ZIPF_SLOTS,
            host_cache_bytes=int(ZIPF_ADAPTERS * ZIPF_HOST_FRACTION * weights.nbytes),
        )
    )
    loaded = load_base_model(config.model, config.quantization, config.compute_dtype, config.device)
    core = EngineCore(loaded, config)
    for i in range(ZIPF_ADAPTERS):
        core.adapters.load(f"zipf-{i}", adapter_dirs[i % len(adapter_dirs)])
    return core


def cold_load_ms(core: EngineCore, adapter_dir: Path, loads: int = COLD_LOADS) -> list[float]:
    """Milliseconds from asking for an adapter that is in no tier to its slot being ready."""
    manager = core.adapters
    times = []
    for i in range(loads):
        key = manager.load(f"cold-{i}", adapter_dir)
        manager.forget(key)  # out of the host tier (and of any slot): only on disk now
        start = time.perf_counter()
        grant = manager.acquire(key)
        assert grant.slot is not None, "no free slot for the cold-load measurement"
        assert manager.wait_for_loads(timeout=60)
        grant = manager.acquire(key, grant.slot)
        assert grant.admission is Admission.READY, grant.error
        times.append((time.perf_counter() - start) * 1e3)
        manager.release(grant.slot)
        manager.unload(f"cold-{i}")
    return times


def dora_cold_load_ms(
    core: EngineCore, model_dir: Path, rank: int, alpha: float, targets: tuple[str, ...]
) -> list[float]:
    """`cold_load_ms` for a DoRA adapter of this rank on these targets (written once, cached)."""
    dora = prepare_lora_adapters(model_dir, 1, rank, alpha, targets, dora=True)
    return cold_load_ms(core, next(iter(dora.values())))


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def summarize_cold_loads(times: list[float], kind: str = "") -> dict[str, float]:
    """p50 and p99 of `times`; kind ("dora") names a case other than plain LoRA."""
    name = f"adapter_cold_load_{kind}_ms" if kind else "adapter_cold_load_ms"
    return {f"{name}_p50": statistics.median(times), f"{name}_p99": percentile(times, 0.99)}
