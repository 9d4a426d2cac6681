"""Shared fixtures: tiny random models and PEFT adapters, built on the fly (no downloads).

Gemma2 is the architecture whose attention the paged kernels do not compute (logit softcapping,
here strong enough to change the logits, and a sliding window shorter than the prompts), so its
layers run transformers' own eager attention over the paged cache.
"""

from __future__ import annotations

import os

from loraserve.cli import OPENMP_SPIN_COUNT  # imports no torch

# The engines tests run compute beside other threads (adapter loads), the servers the tests
# start, and whatever else a CI machine runs: spin as briefly as `loraserve serve` does (see
# docs/performance.md, "Threads"). libgomp reads it when torch loads.
os.environ.setdefault("GOMP_SPINCOUNT", OPENMP_SPIN_COUNT)

import logging
from dataclasses import dataclass, field
from pathlib import Path

import loraserve.model.bitsandbytes_offline  # noqa: F401  (before peft, which imports it)

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from loraserve.model.tiny import write_tiny_model

logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--soak",
        action="store_true",
        help="run the reliability soak test (mixed load and adapter churn; not for CI)",
    )
    parser.addoption("--soak-minutes", type=float, default=30.0, help="its length (30)")


ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
ARCHS = ("llama", "mistral", "qwen2", "gemma2")
ARCH_OVERRIDES = {
    "gemma2": dict(
        head_dim=32, query_pre_attn_scalar=32, attn_logit_softcapping=2.0, sliding_window=8
    ),
}


@dataclass(frozen=True)
class AdapterSpec:
    name: str
    rank: int
    alpha: float
    targets: tuple[str, ...]
    rslora: bool = False
    rank_pattern: dict = field(default_factory=dict)  # PEFT's: module pattern -> r
    alpha_pattern: dict = field(default_factory=dict)  # PEFT's: module pattern -> lora_alpha
    dora: bool = False  # use_dora
    bias: str = "none"  # PEFT's bias: "none", "all" or "lora_only"
    lora_bias: bool = False


# Ranks 1..64, alpha != r, subsets of modules, one rsLoRA, one with per-module rank and alpha
# patterns (the first matching key wins, "." matches any character): the mix the parity tests
# run together.
ADAPTER_SPECS = (
    AdapterSpec("r1-qv", 1, 2.0, ("q_proj", "v_proj")),
    AdapterSpec("r4-attn", 4, 8.0, ATTENTION),
    AdapterSpec("r8-all", 8, 16.0, ATTENTION + MLP),
    AdapterSpec("r16-mlp", 16, 8.0, MLP),
    AdapterSpec("r64-all", 64, 32.0, ATTENTION + MLP),
    AdapterSpec("r8-rslora", 8, 4.0, ATTENTION + MLP, rslora=True),
    AdapterSpec("r2-o-down", 2, 6.0, ("o_proj", "down_proj")),
    AdapterSpec(
        "r32-kv-up",
        32,
        16.0,
        ("k_proj", "v_proj", "up_proj"),
        rank_pattern={"v_proj": 16, "layers.1.mlp.up_proj": 8},
        alpha_pattern={r"layers\.1\.self_attn\.(k|v)_proj": 48.0, "v_proj": 4.0, "up.proj": 2.0},
    ),
)


# The other kinds of adapter PEFT trains, each served in a batch with plain LoRA and the base:
# DoRA (also on the embedding), LoRA on the input embedding, lora_B biases, trained base biases
# (Qwen2 has q/k/v biases; on the others bias="all" and "lora_only" find none to train).
KIND_SPECS = (
    AdapterSpec("dora-r8", 8, 16.0, (*ATTENTION, "up_proj", "down_proj"), dora=True),
    AdapterSpec("embed-r4", 4, 8.0, ("embed_tokens", "q_proj", "v_proj")),
    AdapterSpec("dora-embed-r4", 4, 4.0, ("embed_tokens", "k_proj", "gate_proj"), dora=True),
    AdapterSpec("lora-bias-r4", 4, 8.0, ATTENTION, lora_bias=True, bias="all"),
    AdapterSpec("dora-bias-r8", 8, 8.0, ("q_proj", "v_proj", "up_proj"), dora=True, bias="all"),
)


def write_adapter(base_dir: Path, out_dir: Path, spec: AdapterSpec, seed: int) -> Path:
    """Save a PEFT LoRA adapter for the model at `base_dir` with random (non-zero) weights:
    A and B, DoRA magnitudes within 20% of the base's norms, biases moved off the base's."""
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    config = LoraConfig(
        r=spec.rank,
        lora_alpha=spec.alpha,
        target_modules=list(spec.targets),
        use_rslora=spec.rslora,
        lora_dropout=0.0,
        rank_pattern=dict(spec.rank_pattern),
        alpha_pattern=dict(spec.alpha_pattern),
        use_dora=spec.dora,
        bias=spec.bias,
        lora_bias=spec.lora_bias,
    )
    peft_model = get_peft_model(base, config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            noise = torch.randn(param.shape, generator=gen)
            if "lora_magnitude_vector" in name:
                param.mul_(1 + 0.2 * noise)
            elif "lora_embedding_A" in name:  # [r, vocab]: scaled by r, not by the vocabulary
                param.copy_(noise * 0.3)
            elif "lora_" in name:
                param.copy_(noise * 0.3 / param.shape[-1] ** 0.5)
            elif param.requires_grad:  # a base bias PEFT trains (bias="all" / "lora_only")
                param.add_(noise * 0.1)
    peft_model.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {
        arch: write_tiny_model(root / arch, arch, seed=i, **ARCH_OVERRIDES.get(arch, {}))
        for i, arch in enumerate(ARCHS)
    }


@pytest.fixture(scope="session")
def adapter_dirs(model_dirs, tmp_path_factory) -> dict[str, dict[str, Path]]:
    """arch -> adapter name -> PEFT directory, for every spec in ADAPTER_SPECS."""
    root = tmp_path_factory.mktemp("adapters")
    return {
        arch: {
            spec.name: write_adapter(base, root / arch / spec.name, spec, seed=100 + i)
            for i, spec in enumerate(ADAPTER_SPECS)
        }
        for arch, base in model_dirs.items()
    }


@pytest.fixture(scope="session")
def kind_adapter_dirs(model_dirs, tmp_path_factory) -> dict[str, dict[str, Path]]:
    """arch -> adapter name -> PEFT directory, for every spec in KIND_SPECS."""
    root = tmp_path_factory.mktemp("kind-adapters")
    return {
        arch: {
            spec.name: write_adapter(base, root / arch / spec.name, spec, seed=200 + i)
            for i, spec in enumerate(KIND_SPECS)
        }
        for arch, base in model_dirs.items()
    }
