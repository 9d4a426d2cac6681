"""Helpers shared by the benchmark scripts: cached random models and adapters, workloads, timing.

Models are random-weight Llama-shaped checkpoints written with `write_tiny_model`; adapters are
PEFT LoRA directories with random non-zero A and B. Both are written once under a cache
directory named after their shapes and reused by later runs.

Knows nothing about what a benchmark compares or how it reports.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import loraserve.model.bitsandbytes_offline  # noqa: F401  (before peft, which imports it)

import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from loraserve.model.loading import DTYPES
from loraserve.model.tiny import write_tiny_model

DEFAULT_CACHE_DIR = Path.home() / ".cache" / "loraserve" / "bench"


@dataclass(frozen=True)
class ModelSpec:
    """A random-weight Llama-shaped base; its fields name its cache directory."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    vocab_size: int
    initializer_range: float = 0.02
    seed: int = 0
    weights_dtype: str = "fp32"  # how the checkpoint stores its weights: "fp32" or "bf16"

    def cache_key(self) -> str:
        fields = asdict(self)
        if self.weights_dtype == "fp32":  # the key fp32 models had before the field
            del fields["weights_dtype"]
        text = json.dumps(fields, sort_keys=True)
        return "llama-" + hashlib.sha256(text.encode()).hexdigest()[:12]


def prepare_model(spec: ModelSpec, cache_root: Path = DEFAULT_CACHE_DIR) -> Path:
    """The model directory for `spec`, written on first use."""
    path = cache_root / spec.cache_key() / "model"
    if not (path / "config.json").exists():
        staging = path.with_name("model.partial")
        write_tiny_model(
            staging,
            "llama",
            hidden_size=spec.hidden_size,
            intermediate_size=spec.intermediate_size,
            num_layers=spec.num_layers,
            num_heads=spec.num_heads,
            num_kv_heads=spec.num_kv_heads,
            vocab_size=spec.vocab_size,
            initializer_range=spec.initializer_range,
            seed=spec.seed,
            weights_dtype=DTYPES[spec.weights_dtype],
        )
        staging.replace(path)
    return path


def prepare_lora_adapters(
    model_dir: Path,
    count: int,
    rank: int,
    alpha: float,
    targets: tuple[str, ...],
    seed: int = 0,
    dora: bool = False,
) -> dict[str, Path]:
    """`count` PEFT LoRA adapters for the model at `model_dir`, random non-zero A and B (and,
    with `dora`, DoRA magnitudes within 20% of the base's norms), one seed each; written on
    first use next to the model. Returns name -> directory."""
    short = "-".join(t.removesuffix("_proj") for t in targets)
    kind = "dora" if dora else "lora"
    root = model_dir.parent / f"{kind}-r{rank}-alpha{alpha:g}-{short}-seed{seed}"
    dirs = {f"adapter-{i:02d}": root / f"adapter-{i:02d}" for i in range(count)}
    missing = [
        (i, d) for i, d in enumerate(dirs.values()) if not (d / "adapter_config.json").exists()
    ]
    if not missing:
        return dirs
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = LoraConfig(
        r=rank, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0, use_dora=dora
    )
    model = get_peft_model(base, config)
    lora_params = {name: p for name, p in model.named_parameters() if "lora_" in name}
    norms = {n: p.detach().clone() for n, p in lora_params.items() if "magnitude" in n}
    for i, directory in missing:
        gen = torch.Generator().manual_seed(seed + 100 + i)
        with torch.no_grad():
            for name, param in lora_params.items():
                noise = torch.randn(param.shape, generator=gen)
                if name in norms:
                    param.copy_(norms[name] * (1 + 0.2 * noise))
                else:
                    param.copy_(noise * 0.3 / param.shape[-1] ** 0.5)
        staging = directory.with_name(directory.name + ".partial")
        model.save_pretrained(staging)
        staging.replace(directory)
    return dirs


@dataclass(frozen=True)
class Workload:
    """prompts[i] runs on adapters[i] (when the configuration uses adapters), constrained to
    the JSON schema schemas[i] when there are schemas, generating new_tokens; `staggered`:
    request i generates only its share, new_tokens * (i + 1) // len(prompts) (at least one),
    so that the batch shrinks a row at a time as its requests finish."""

    prompts: tuple[tuple[int, ...], ...]
    adapters: tuple[str, ...]
    new_tokens: int
    schemas: tuple[str, ...] = ()
    staggered: bool = False

    def head(self, n: int, new_tokens: int) -> Workload:
        return Workload(self.prompts[:n], self.adapters[:n], new_tokens, self.schemas[:n],
                        self.staggered)  # fmt: skip

    def new_tokens_of(self, request: int) -> int:
        if not self.staggered:
            return self.new_tokens
        return max(1, self.new_tokens * (request + 1) // len(self.prompts))

    @property
    def generated_tokens(self) -> int:
        """What all its requests generate together."""
        return sum(self.new_tokens_of(i) for i in range(len(self.prompts)))


RunFn = Callable[[Workload], int]  # runs a workload, returns the number of generated tokens


def check_generated(who: str, counts: list[int], expected: int | list[int]) -> None:
    """counts[i] must be expected (or expected[i])."""
    wanted = expected if isinstance(expected, list) else [expected] * len(counts)
    wrong = [(c, w) for c, w in zip(counts, wanted, strict=True) if c != w]
    if wrong:
        raise RuntimeError(
            f"{who}: {len(wrong)} request(s) generated {[c for c, _ in wrong[:4]]} tokens, not "
            f"{[w for _, w in wrong[:4]]}"
        )


@dataclass(frozen=True)
class Run:
    """One timed run. cpu_seconds far below seconds x threads means the machine was contended."""

    seconds: float  # wall time
    cpu_seconds: float  # this process's CPU time, all threads
    tokens: int

    @property
    def tok_s(self) -> float:
        return self.tokens / self.seconds


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], int], device: torch.device) -> Run:
    """Run `fn` (which returns the tokens it generated) and time it, waiting for the device."""
    synchronize(device)
    start, cpu_start = time.perf_counter(), time.process_time()
    tokens = fn()
    synchronize(device)
    return Run(time.perf_counter() - start, time.process_time() - cpu_start, tokens)


def stored_in(adapter_dirs: dict[str, Path], dtype: torch.dtype) -> dict[str, Path]:
    """A copy of each PEFT adapter directory with its tensors saved in `dtype` (bf16 or fp16, as
    adapters trained or cast so are), written on first use next to the originals. Returns
    name -> directory."""
    suffix = {torch.bfloat16: "-bf16", torch.float16: "-fp16"}[dtype]
    copies = {}
    for name, directory in adapter_dirs.items():
        copy = directory.parent.with_name(directory.parent.name + suffix) / directory.name
        copies[name] = copy
        if (copy / "adapter_config.json").exists():
            continue
        staging = copy.with_name(copy.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(directory, staging)
        weights = staging / "adapter_model.safetensors"
        save_file({k: t.to(dtype) for k, t in load_file(weights).items()}, weights)
        staging.replace(copy)
    return copies
