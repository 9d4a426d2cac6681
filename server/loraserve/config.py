"""Engine configuration: one frozen dataclass, built once at start-up and passed down.

Knows nothing about where the values came from (flags, environment, files): the CLI builds it.
"""

from __future__ import annotations

from dataclasses import dataclass, fields


@dataclass(frozen=True)
class EngineConfig:
    """Everything the engine needs to load the base model and size its caches.

    model: a local HF directory or hub id; None serves the small built-in default model.
    kv_cache_tokens: the KV budget in tokens, shared by all running sequences.
    max_context: the most tokens (prompt + generated) one request may hold.
    max_step_tokens: the most tokens one engine step feeds the model (prefill is chunked to fit).
    device_slots: adapters resident on the device at once (slot 0, the base, is extra).
    lora_target_modules: restrict which projections get LoRA slots (empty = every linear layer).
    """

    model: str | None = None
    quantization: str = "nf4"
    compute_dtype: str = "fp32"
    device: str = "auto"
    max_rank: int = 64
    device_slots: int = 8
    lora_target_modules: tuple[str, ...] = ()
    kv_cache_tokens: int = 32768
    kv_block_size: int = 16
    max_context: int = 4096
    max_batch_size: int = 64
    max_step_tokens: int = 2048
    max_waiting: int = 1024

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, int) and not isinstance(value, bool) and value < 1:
                raise ValueError(f"{f.name} must be >= 1, got {value}")
        if self.max_step_tokens < self.max_batch_size:
            raise ValueError("max_step_tokens must be >= max_batch_size (one token per sequence)")
