"""The schema of `adapter_config.json`: a closed, typed model of what PEFT's LoraConfig writes.

`parse_adapter_config` is the only way in. Before anything reads a field it parses the bytes
with a parser that refuses NaN and Infinity and stops at a fixed nesting depth, checks that
every number is finite and the nesting shallow, refuses keys LoraConfig does not write and
features loraserve does not serve, and then validates each field's type and range with a
pydantic model (strict types, finite bounded numbers, bounded strings, lists and mappings).
The `rank_pattern` / `alpha_pattern` keys are compiled with RE2 (`peft_patterns`). Every
problem found is collected, for the caller to report with its own.

`parse_json` is the same bounded parser for other untrusted JSON (safetensors headers, page
tokens).

Knows nothing about tensors, the disk or the base model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import pydantic_core
from pydantic import BaseModel, ConfigDict, Field, JsonValue, StringConstraints, ValidationError
from pydantic_core import ErrorDetails

from loraserve.adapters.peft_patterns import MAX_KEY_CHARS, MAX_KEYS, PatternTable, compile_patterns
from loraserve.types import clip, shown

CONFIG_FILE = "adapter_config.json"
MAX_DEPTH = 16  # of objects and arrays in adapter_config.json
MAX_TEXT_CHARS = 1024
MAX_ITEMS = 4096  # in any list or mapping of the config
MAX_R = 1 << 16
MAX_ALPHA = float(1 << 16)

# Keys whose truthy value changes what the adapter computes at inference in a way we do not serve.
UNSUPPORTED_KEYS = {
    "modules_to_save": "modules_to_save (full copies of base modules) is not served",
    "fan_in_fan_out": "fan_in_fan_out (Conv1D bases) is not served",
    "layer_replication": "layer_replication is not served",
    "alora_invocation_tokens": "activated LoRA (aLoRA) is not served",
    "arrow_config": "Arrow routing is not served",
    "use_qalora": "QA-LoRA is not served",
    "use_bdlora": "block-diagonal LoRA is not served",
    "kasa_config": "KaSA adapters are not served",
    "monteclora_config": "MonteCLoRA adapters are not served",
    "target_parameters": "LoRA on raw parameters (target_parameters) is not served",
    "trainable_token_indices": "trainable token embeddings are not served",
}
# What a number must be, said the way a tenant fixes it; pydantic's words for anything else.
RANK_RULE = f"must be a whole number from 1 to {MAX_R}"
ALPHA_RULE = f"must be a finite number above 0 and at most {MAX_ALPHA:g}"
VALUE_RULES = {  # field -> (length of an error location naming one value, the rule)
    "r": (1, RANK_RULE),
    "lora_alpha": (1, ALPHA_RULE),
    "rank_pattern": (2, RANK_RULE),
    "alpha_pattern": (2, ALPHA_RULE),
}
NAMES_RULE = f"must be a list of names or one name, each at most {MAX_TEXT_CHARS} characters"
FIELD_RULES = {  # fields of several shapes: one line for the field, not one per shape
    "target_modules": NAMES_RULE,
    "exclude_modules": NAMES_RULE,
    "layers_pattern": NAMES_RULE,
    "layers_to_transform": "must be a list of whole numbers or one whole number",
    "init_lora_weights": "must be true, false or the name of an initialisation",
}

Text = Annotated[str, StringConstraints(max_length=MAX_TEXT_CHARS)]
Names = Annotated[list[Text], Field(max_length=MAX_ITEMS)]
Rank = Annotated[int, Field(ge=1, le=MAX_R)]
Alpha = Annotated[float, Field(gt=0, le=MAX_ALPHA, allow_inf_nan=False)]
Key = Annotated[str, StringConstraints(min_length=1, max_length=MAX_KEY_CHARS)]
Settings = Annotated[dict[Text, JsonValue], Field(max_length=MAX_ITEMS)]  # stored, never read


class LoraAdapterConfig(BaseModel):
    """Every key PEFT's LoraConfig (peft 0.21) writes; any other key is refused.

    The unsupported features (UNSUPPORTED_KEYS) are refused when truthy before this model is
    built, so here they may only hold a falsy JSON value.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)

    peft_type: Text = "LORA"
    r: Rank
    lora_alpha: Alpha
    use_rslora: bool = False
    rank_pattern: Annotated[dict[Key, Rank], Field(max_length=MAX_KEYS)] | None = None
    alpha_pattern: Annotated[dict[Key, Alpha], Field(max_length=MAX_KEYS)] | None = None
    target_modules: Names | Text | None = None
    exclude_modules: Names | Text | None = None
    layers_to_transform: Annotated[list[int], Field(max_length=MAX_ITEMS)] | int | None = None
    layers_pattern: Names | Text | None = None
    lora_dropout: Annotated[float, Field(ge=0, le=1)] = 0.0
    bias: Literal["none", "all", "lora_only"] = "none"
    lora_bias: bool = False
    use_dora: bool = False
    init_lora_weights: bool | Text = True
    inference_mode: bool = False
    ensure_weight_tying: bool = False
    qalora_group_size: Annotated[int, Field(ge=1, le=MAX_R)] = 16
    task_type: Text | None = None
    peft_version: Text | None = None
    base_model_name_or_path: Text | None = None
    revision: Text | None = None
    megatron_core: Text | None = None
    auto_mapping: Settings | None = None
    megatron_config: Settings | None = None
    loftq_config: Settings | None = None
    eva_config: Settings | None = None
    corda_config: Settings | None = None
    lora_ga_config: Settings | None = None
    velora_config: Settings | None = None
    modules_to_save: JsonValue = None
    fan_in_fan_out: JsonValue = False
    layer_replication: JsonValue = None
    alora_invocation_tokens: JsonValue = None
    arrow_config: JsonValue = None
    use_qalora: JsonValue = False
    use_bdlora: JsonValue = None
    kasa_config: JsonValue = None
    monteclora_config: JsonValue = None
    target_parameters: JsonValue = None
    trainable_token_indices: JsonValue = None


CONFIG_KEYS = frozenset(LoraAdapterConfig.model_fields)


@dataclass(frozen=True)
class AdapterConfig:
    """A validated adapter_config.json with its pattern keys compiled."""

    fields: LoraAdapterConfig
    ranks: PatternTable[int]  # module path -> r, defaulting to fields.r
    alphas: PatternTable[float]  # module path -> lora_alpha, defaulting to fields.lora_alpha

    def rank(self, module: str) -> int:
        return self.ranks.value(module, self.fields.r)

    def scale(self, module: str, rank: int) -> float:
        """What PEFT multiplies the module's delta by: alpha / r, or alpha / sqrt(r)."""
        alpha = self.alphas.value(module, self.fields.lora_alpha)
        return alpha / math.sqrt(rank) if self.fields.use_rslora else alpha / rank


def parse_json(data: bytes | str, what: str) -> Any:
    """JSON with only finite numbers and a parser-bounded depth; ValueError says what is wrong.

    `what` names the text in the message, e.g. "adapter_config.json".
    """
    try:
        return pydantic_core.from_json(data, allow_inf_nan=False)
    except ValueError as error:
        reason = str(error)
    if "recursion limit" in reason:
        raise ValueError(f"{what} is nested too deeply ({reason})")
    try:
        pydantic_core.from_json(data, allow_inf_nan=True)
    except ValueError:
        raise ValueError(f"{what} is not valid JSON: {reason}") from None
    raise ValueError(f"{what} holds NaN or Infinity: every number must be finite")


def _shape_problem(value: object) -> str | None:
    """Why `value` is nested too deeply or holds a non-finite number, or None."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, float) and not math.isfinite(item):
            return (
                f"{CONFIG_FILE} holds a number beyond the float range; every number must be finite"
            )
        if isinstance(item, (dict, list)):
            if depth > MAX_DEPTH:
                return f"{CONFIG_FILE} is nested more than {MAX_DEPTH} levels deep"
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)
    return None


def _error_line(error: ErrorDetails) -> str:
    """One pydantic error as "<where>: <what is wrong>, got <value>", every part bounded."""
    loc = error["loc"]
    field = str(loc[0]) if loc else ""
    where = clip(".".join(str(part) for part in loc), 80) or CONFIG_FILE
    if field in FIELD_RULES:
        return f"{field}: {FIELD_RULES[field]}"
    if error["type"] == "missing":
        return f"{where}: is required"
    length, rule = VALUE_RULES.get(field, (0, ""))
    what = rule if len(loc) == length else error["msg"]
    return f"{where}: {what}, got {shown(error['input'], 40)}"


def parse_adapter_config(data: bytes, problems: list[str]) -> AdapterConfig | None:
    """Validate the bytes of adapter_config.json; None after adding every problem found."""
    found: list[str] = []
    try:
        raw = parse_json(data, CONFIG_FILE)
    except ValueError as error:
        raw = None
        found.append(str(error))
    if raw is not None and not isinstance(raw, dict):
        found.append(f"{CONFIG_FILE} must hold a JSON object")
    elif raw is not None and (problem := _shape_problem(raw)):
        found.append(problem)
    if found or not isinstance(raw, dict):
        problems.extend(found)
        return None
    peft_type = raw.get("peft_type", "LORA")
    if not isinstance(peft_type, str) or peft_type.upper() != "LORA":
        problems.append(
            f"peft_type {shown(peft_type)} is not served: loraserve serves LoRA adapters only"
        )
        return None
    unknown = sorted(set(raw) - CONFIG_KEYS)
    if unknown:
        listed = ", ".join(shown(key, 40) for key in unknown[:5])
        more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
        found.append(
            f"{CONFIG_FILE} has unknown keys [{listed}{more}]: only the keys PEFT's LoraConfig "
            "writes are accepted"
        )
    for key, why in UNSUPPORTED_KEYS.items():
        if raw.get(key):
            found.append(f"{key} is set: {why}")
    try:
        fields = LoraAdapterConfig.model_validate(
            {k: v for k, v in raw.items() if k in CONFIG_KEYS}
        )
    except ValidationError as error:
        lines = dict.fromkeys(_error_line(e) for e in error.errors(include_url=False))
        problems.extend(found + list(lines))
        return None
    if fields.use_dora and fields.lora_bias:
        found.append("use_dora and lora_bias are both set: PEFT trains no lora_B bias with DoRA")
    ranks = compile_patterns("rank_pattern", fields.rank_pattern or {}, found)
    alphas = compile_patterns("alpha_pattern", fields.alpha_pattern or {}, found)
    problems.extend(found)
    return None if found else AdapterConfig(fields, ranks, alphas)
