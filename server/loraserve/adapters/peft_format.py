"""Read and validate a PEFT LoRA directory into per-module tensors ready for a device slot.

Reads only `adapter_config.json` and `adapter_model.safetensors` (never pickle, never remote
code, never a download: `base_model_name_or_path` is an opaque string). The config goes through
its schema (`peft_config`); file sizes and the safetensors header length are capped and checked
before anything is parsed, and the header is parsed with bounded nesting. Every problem found is
collected and reported at once (the error keeps the first few and counts the rest). Scaling
(alpha / r, or alpha / sqrt(r) for rsLoRA, with per-module `alpha_pattern` / `rank_pattern`,
matched as PEFT does but by RE2) is folded into B here, so the hot path never sees it; weights
that are not finite before or after that folding are refused.

Besides lora_A / lora_B on projections it reads what PEFT saves for the other kinds it serves:
lora_embedding_A / lora_embedding_B on the input embedding (and the copy of the base embedding
PEFT saves next to them), lora_magnitude_vector (`use_dora`), lora_B's bias (`lora_bias`) and
trained base biases (`bias="all"` / `"lora_only"`), each checked against the config that says
the adapter has it. What needs the base model's weights (DoRA's norm, a bias's difference from
the base's) is left to the layers (`ModuleWeights`, `slot_terms`).

Knows nothing about slots, caches or the model object: it checks tensors against a map of
target module paths to (in_features, out_features).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from loraserve.adapters.peft_config import (
    CONFIG_FILE,
    AdapterConfig,
    LoraAdapterConfig,
    parse_adapter_config,
)
from loraserve.adapters.peft_tensors import (
    PAIRS,
    CheckedModule,
    checked_module,
    module_weights,
    tensor_role,
)
from loraserve.adapters.safetensors_file import read_safetensors
from loraserve.model.slot_terms import ModuleWeights
from loraserve.types import AdapterIncompatibleError, InvalidAdapterError, shown

WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_FILES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth", "pytorch_model.bin")
PICKLE_ADVICE = (
    "pickle files are never loaded; convert them with `safetensors.torch.save_file` or save the "
    "adapter with PEFT's default safe_serialization=True"
)
PAIR_ROLES = {role for pair in PAIRS.values() for role in pair}
MAX_CONFIG_BYTES = 1 << 20


@dataclass(frozen=True)
class LoraWeights:
    """A validated adapter: module path -> its tensors (scaling folded into B, or applied by
    the slot write to a pair held as stored: `ModuleWeights.unscaled`)."""

    modules: dict[str, ModuleWeights]
    rank: int  # the largest rank over modules
    config: LoraAdapterConfig
    dtype: torch.dtype  # the compute dtype they were converted for

    @property
    def nbytes(self) -> int:
        """Host bytes holding these weights costs: each storage under them once."""
        storages: dict[int, int] = {}
        for module in self.modules.values():
            storages.update(module.storages())
        return sum(storages.values())


def _read_config(directory: Path, problems: list[str]) -> AdapterConfig | None:
    path = directory / CONFIG_FILE
    if not path.is_file():
        problems.append(f"{CONFIG_FILE} is missing")
        return None
    with path.open("rb") as f:
        data = f.read(MAX_CONFIG_BYTES + 1)
    if len(data) > MAX_CONFIG_BYTES:
        problems.append(f"{CONFIG_FILE} is larger than the {MAX_CONFIG_BYTES} byte cap")
        return None
    return parse_adapter_config(data, problems)


def read_peft_adapter(
    directory: str | Path,
    targets: dict[str, tuple[int, int]],
    max_rank: int,
    dtype: torch.dtype,
) -> LoraWeights:
    """Validate `directory` against the base's LoRA targets and load it in `dtype`.

    targets: module path -> (in_features, out_features) of every module an adapter may hit
    (projections; the input embedding as (vocabulary, hidden size)).
    Raises InvalidAdapterError (malformed files) or AdapterIncompatibleError (does not fit the
    base), each listing every problem found.
    """
    directory = Path(directory)
    problems: list[str] = []
    if not directory.is_dir():
        raise InvalidAdapterError(f"adapter directory {str(directory)!r} does not exist")
    config = _read_config(directory, problems)
    weights_path = directory / WEIGHTS_FILE
    stored: dict[str, torch.Tensor] = {}
    if not weights_path.is_file():
        pickles = [name for name in PICKLE_FILES if (directory / name).exists()]
        hint = (
            f"found {', '.join(pickles)}: {PICKLE_ADVICE}"
            if pickles
            else "save the adapter with PEFT's save_pretrained"
        )
        problems.append(f"{WEIGHTS_FILE} is missing ({hint})")
    else:
        try:
            stored = read_safetensors(weights_path)
        except InvalidAdapterError as e:
            problems.extend(e.problems)
        except OSError as e:
            problems.append(f"{WEIGHTS_FILE} cannot be read: {e}")
    if problems or config is None:
        raise InvalidAdapterError(f"adapter at {directory.name!r} is invalid:", problems)

    parts: dict[str, dict[str, torch.Tensor]] = {}  # module -> role -> tensor
    for name, tensor in stored.items():
        role = tensor_role(name)
        if role is None:
            problems.append(f"tensor {shown(name)} is not a LoRA A/B weight")
            continue
        parts.setdefault(role[0], {})[role[1]] = tensor

    checked: dict[str, CheckedModule] = {}
    incompatible: list[str] = []
    for module, tensors in sorted(parts.items()):
        found = checked_module(module, tensors, targets, config, max_rank, problems, incompatible)
        if found is not None:
            checked[module] = found
    converted = module_weights(checked, dtype)
    modules = converted.modules
    for module in converted.not_finite:
        rank = modules.pop(module).a.shape[0]
        scale = config.scale(module, rank) if rank else 1.0
        problems.append(
            f"{module}: weights are not finite (NaN or infinity), as stored or once scaled by "
            f"{scale:g} (lora_alpha / r) in {str(dtype).removeprefix('torch.')}"
        )
    if not any(role in PAIR_ROLES for tensors in parts.values() for role in tensors):
        problems.append(f"{WEIGHTS_FILE} holds no LoRA tensors")
    if problems:
        raise InvalidAdapterError(
            f"adapter at {directory.name!r} is invalid:", problems + incompatible
        )
    if incompatible:
        raise AdapterIncompatibleError(
            f"adapter at {directory.name!r} does not fit this base model:", incompatible
        )
    return LoraWeights(modules, max(m.a.shape[0] for m in modules.values()), config.fields, dtype)
