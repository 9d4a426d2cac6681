"""Read and validate a PEFT LoRA directory into per-module tensors ready for a device slot.

Reads only `adapter_config.json` and `adapter_model.safetensors` (never pickle, never remote
code, never a download: `base_model_name_or_path` is an opaque string). The config goes through
its schema (`peft_config`); file sizes and the safetensors header length are capped and checked
before anything is parsed, and the header is parsed with bounded nesting. Every problem found is
collected and reported at once (the error keeps the first few and counts the rest). Scaling
(alpha / r, or alpha / sqrt(r) for rsLoRA, with per-module `alpha_pattern` / `rank_pattern`,
matched as PEFT does but by RE2) is folded into B here, so the hot path never sees it; weights
that are not finite before or after that folding are refused.

Knows nothing about slots, caches or the model object: it checks tensors against a map of
target module paths to (in_features, out_features).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from loraserve.adapters.peft_config import (
    CONFIG_FILE,
    AdapterConfig,
    LoraAdapterConfig,
    parse_adapter_config,
    parse_json,
)
from loraserve.types import AdapterIncompatibleError, InvalidAdapterError, shown

WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_FILES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth", "pytorch_model.bin")
ALLOWED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
PEFT_PREFIX = "base_model.model."
TENSOR_NAME = re.compile(r"^(?P<module>.+)\.lora_(?P<kind>[AB])(?:\.[^.]+)?\.weight$")
PICKLE_ADVICE = (
    "pickle files are never loaded; convert them with `safetensors.torch.save_file` or save the "
    "adapter with PEFT's default safe_serialization=True"
)
MAX_CONFIG_BYTES = 1 << 20
MAX_WEIGHTS_BYTES = 2 << 30
MAX_HEADER_BYTES = 100_000_000  # safetensors' own reader refuses larger headers too
HEADER_LENGTH_BYTES = 8  # a safetensors file opens with its header length, u64 little-endian


@dataclass(frozen=True)
class LoraWeights:
    """A validated adapter: module path -> (a [r, in], b [r, out] with scaling folded in)."""

    modules: dict[str, tuple[torch.Tensor, torch.Tensor]]
    rank: int  # the largest rank over modules
    config: LoraAdapterConfig

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes + b.nbytes for a, b in self.modules.values())


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


def _invalid_weights(path: Path, problem: str) -> InvalidAdapterError:
    return InvalidAdapterError(f"{path.name} is invalid:", [f"{path.name}: {problem}"])


def safetensors_header(path: Path) -> dict:
    """The JSON header of a safetensors file, parsed only after its length passes the caps.

    Raises InvalidAdapterError naming the problem: oversized file or header, truncated file, or a
    header that is not a JSON object.
    """
    size = path.stat().st_size
    if size > MAX_WEIGHTS_BYTES:
        raise _invalid_weights(path, f"{size} bytes is over the {MAX_WEIGHTS_BYTES} byte cap")
    with path.open("rb") as f:
        prefix = f.read(HEADER_LENGTH_BYTES)
        length = int.from_bytes(prefix, "little")
        if len(prefix) < HEADER_LENGTH_BYTES:
            raise _invalid_weights(path, "too short to be a safetensors file")
        if length > MAX_HEADER_BYTES:
            raise _invalid_weights(
                path, f"header claims {length} bytes, over the {MAX_HEADER_BYTES} byte cap"
            )
        if length > size - HEADER_LENGTH_BYTES:
            raise _invalid_weights(path, f"header claims {length} bytes of a {size} byte file")
        text = f.read(length)
    try:
        header = parse_json(text, "header")
    except ValueError as e:
        raise _invalid_weights(path, str(e)) from None
    if not isinstance(header, dict):
        raise _invalid_weights(path, "header is not a JSON object")
    return header


def _not_finite(modules: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> list[str]:
    """The modules whose A or B holds a NaN or an infinity: one pass over every tensor."""
    names = list(modules)
    tensors = [t for name in names for t in modules[name]]
    if not tensors:
        return []
    peaks = torch.stack(torch._foreach_norm(tensors, ord=float("inf")))  # max |x|, NaN kept
    bad = (~peaks.isfinite()).view(-1, 2).any(dim=1).tolist()
    return [name for name, is_bad in zip(names, bad) if is_bad]


def read_peft_adapter(
    directory: str | Path,
    targets: dict[str, tuple[int, int]],
    max_rank: int,
    dtype: torch.dtype,
) -> LoraWeights:
    """Validate `directory` against the base's LoRA targets and load it in `dtype`.

    targets: module path -> (in_features, out_features) of every projection an adapter may hit.
    Raises InvalidAdapterError (malformed files) or AdapterIncompatibleError (does not fit the
    base), each listing every problem found.
    """
    directory = Path(directory)
    problems: list[str] = []
    if not directory.is_dir():
        raise InvalidAdapterError(f"adapter directory {str(directory)!r} does not exist")
    config = _read_config(directory, problems)
    weights_path = directory / WEIGHTS_FILE
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
            safetensors_header(weights_path)
        except InvalidAdapterError as e:
            problems.extend(e.problems)
    if problems or config is None:
        raise InvalidAdapterError(f"adapter at {directory.name!r} is invalid:", problems)

    pairs: dict[str, dict[str, torch.Tensor]] = {}
    try:
        with safe_open(weights_path, framework="pt", device="cpu") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                match = TENSOR_NAME.match(name)
                if match is None:
                    problems.append(f"tensor {shown(name)} is not a LoRA A/B weight")
                    continue
                module = match["module"].removeprefix(PEFT_PREFIX)
                pairs.setdefault(module, {})[match["kind"]] = f.get_tensor(name)
    except (SafetensorError, OSError, ValueError) as e:
        raise InvalidAdapterError(
            f"adapter at {directory.name!r} is invalid:", [f"{WEIGHTS_FILE} cannot be read: {e}"]
        ) from e

    modules: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    scales: dict[str, float] = {}
    incompatible: list[str] = []
    for module, pair in sorted(pairs.items()):
        if set(pair) != {"A", "B"}:
            problems.append(
                f"{module}: needs both lora_A and lora_B, found only lora_{''.join(pair)}"
            )
            continue
        a, b = pair["A"], pair["B"]  # a: [r, in], b: [out, r]
        if a.dtype not in ALLOWED_DTYPES or b.dtype not in ALLOWED_DTYPES:
            problems.append(f"{module}: dtype {a.dtype}/{b.dtype} not allowed (fp16, bf16, fp32)")
            continue
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            problems.append(
                f"{module}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} "
                "are not [r, in] and [out, r]"
            )
            continue
        rank = a.shape[0]
        if module not in targets:
            incompatible.append(f"{module}: the base model has no LoRA-targetable module there")
            continue
        fan_in, fan_out = targets[module]
        if a.shape[1] != fan_in or b.shape[0] != fan_out:
            incompatible.append(
                f"{module}: adapter is [in={a.shape[1]}, out={b.shape[0]}], base module is "
                f"[in={fan_in}, out={fan_out}]"
            )
            continue
        if rank > max_rank:
            incompatible.append(f"{module}: rank {rank} exceeds the server's max rank {max_rank}")
            continue
        if rank != config.rank(module):
            problems.append(
                f"{module}: lora_A and lora_B have rank {rank}, but {CONFIG_FILE} gives "
                f"r={config.rank(module)} (r or rank_pattern) for this module"
            )
            continue
        scale = config.scale(module, rank)
        scales[module] = scale
        # own copies: a tensor from safe_open maps the file, which may change under it
        a = a.to(dtype, copy=True)
        b = b.t().to(torch.float32).contiguous().mul_(scale).to(dtype)  # [r, out]
        modules[module] = (a, b)
    for module in _not_finite(modules):
        problems.append(
            f"{module}: weights are not finite (NaN or infinity), as stored or once scaled by "
            f"{scales[module]:g} (lora_alpha / r) in {str(dtype).removeprefix('torch.')}"
        )
        del modules[module]
    if not pairs:
        problems.append(f"{WEIGHTS_FILE} holds no LoRA tensors")
    if problems:
        raise InvalidAdapterError(
            f"adapter at {directory.name!r} is invalid:", problems + incompatible
        )
    if incompatible:
        raise AdapterIncompatibleError(
            f"adapter at {directory.name!r} does not fit this base model:", incompatible
        )
    return LoraWeights(modules, max(a.shape[0] for a, _ in modules.values()), config.fields)
