"""What the machine can do and what a workload asks of it: the CPU, the best dense matmul this
run measures, and the model FLOPs of a generation workload.

`model_flops` counts what the model must compute, whoever computes it: every decoder
projection once per token fed, attention over each token's context (2 multiply-adds per key
for scores and per value for the output, per head), and the output projection once per logits
row kept (one per prompt, one per generated token but the last). Element-wise work (norms,
rotary, activations) is left out: it is below 1% of these at the benchmark's shapes.

Knows nothing about engines or baselines.
"""

from __future__ import annotations

import os
import platform
import time
from dataclasses import dataclass

from loraserve.model.bitsandbytes_offline import bnb

import peft
import torch
import transformers

PEAK_SIZE = 2048
PEAK_TRIES = 5
# Environment variables that hold a run to fewer instructions than the CPU has (MKL's GEMMs,
# torch's vectorised ops, loraserve's kernels): set to all three "avx2" / "AVX2", an AVX-512
# machine runs the code an AVX2-only CPU would.
INSTRUCTION_LIMITS = ("MKL_ENABLE_INSTRUCTIONS", "ATEN_CPU_CAPABILITY", "LORASERVE_KERNELS")


def cpu_model() -> tuple[str, list[str]]:
    """The CPU's model name and its vector features (from /proc/cpuinfo; empty elsewhere)."""
    name, flags = platform.processor(), []
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and not name:
                    name = value.strip()
                elif key.strip() == "flags":
                    flags = value.split()
                if name and flags:
                    break
    except OSError:
        pass
    vector = sorted(f for f in flags if f.startswith(("avx", "amx", "fma", "f16c", "sse4")))
    return name, vector


def machine_info() -> dict:
    name, vector = cpu_model()
    info = {
        "platform": platform.platform(),
        "cpu_model": name,
        "cpu_vector_features": vector,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "instruction_limits": {k: os.environ[k] for k in INSTRUCTION_LIMITS if k in os.environ},
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "bitsandbytes": bnb.__version__,
        "peft": peft.__version__,
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def matmul_gflops(dtype: torch.dtype, device: torch.device, tries: int = PEAK_TRIES) -> float:
    """The best of `tries` dense [PEAK_SIZE]^3 matmuls in `dtype`, in GFLOP/s."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(PEAK_SIZE, PEAK_SIZE, generator=gen).to(device, dtype)
    b = torch.randn(PEAK_SIZE, PEAK_SIZE, generator=gen).to(device, dtype)
    best = float("inf")
    for _ in range(tries + 1):  # the first warms up
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * PEAK_SIZE**3 / best / 1e9


@dataclass(frozen=True)
class Shapes:
    """What the FLOP count needs of a decoder-only transformer's config."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int

    @classmethod
    def of(cls, config) -> Shapes:
        heads = config.num_attention_heads
        return cls(
            config.hidden_size,
            config.intermediate_size,
            config.num_hidden_layers,
            heads,
            getattr(config, "num_key_value_heads", None) or heads,
            getattr(config, "head_dim", None) or config.hidden_size // heads,
            config.vocab_size,
        )

    @property
    def decoder_params(self) -> int:
        """Weights of every decoder projection (attention and MLP), all layers."""
        attention = self.hidden * self.head_dim * (2 * self.heads + 2 * self.kv_heads)
        return self.layers * (attention + 3 * self.hidden * self.intermediate)

    def token_flops(self, context: int) -> int:
        """One token through the decoder, attending over `context` keys (itself included)."""
        return 2 * self.decoder_params + 4 * self.layers * self.heads * self.head_dim * context

    @property
    def logits_flops(self) -> int:
        return 2 * self.hidden * self.vocab


def prompt_flops(shapes: Shapes, prompt_len: int) -> int:
    """Prefilling one prompt, its last token's logits included."""
    attention = sum(shapes.token_flops(t) for t in range(1, prompt_len + 1))
    return attention + shapes.logits_flops


def decode_flops(shapes: Shapes, context: int) -> int:
    """One decode token at `context` (itself included), with its logits."""
    return shapes.token_flops(context) + shapes.logits_flops


def model_flops(shapes: Shapes, prompt_lens: list[int], new_tokens: int) -> int:
    """Every request prefilled, then decoded to `new_tokens` (the last token is never fed)."""
    total = 0
    for p in prompt_lens:
        total += prompt_flops(shapes, p)
        total += sum(decode_flops(shapes, p + k) for k in range(1, new_tokens))
    return total
