"""The adapter_config.json schema: what PEFT writes parses, PEFT's pattern matching is kept
exactly (RE2 against peft's own `get_pattern_key`), and each refusal names its field."""

from __future__ import annotations

import json

import pytest
from peft import LoraConfig
from peft.utils.other import get_pattern_key

from loraserve.adapters.peft_config import (
    CONFIG_FILE,
    CONFIG_KEYS,
    UNSUPPORTED_KEYS,
    parse_adapter_config,
)

WRITTEN_BY_PEFT = {
    "plain": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
    "patterns": dict(
        r=8,
        lora_alpha=16,
        target_modules=["q_proj", "v_proj", "up_proj"],
        rank_pattern={"v_proj": 4, r"layers\.1\..*": 2},
        alpha_pattern={"up.proj": 32.5},
    ),
    "regex-targets": dict(r=4, target_modules=r".*\.(q|k)_proj", exclude_modules=["lm_head"]),
    "layers": dict(r=4, layers_to_transform=[0, 1], layers_pattern="layers"),
    "one-layer": dict(r=4, layers_to_transform=1, layers_pattern=["layers"]),
    "dora-embedding": dict(r=4, use_dora=True, target_modules=["q_proj", "embed_tokens"]),
    "biases": dict(r=4, bias="lora_only", lora_bias=True, target_modules=["q_proj"]),
    "all-biases": dict(r=4, bias="all", target_modules=["v_proj"]),
    "rslora-dropout-task": dict(
        r=16, use_rslora=True, lora_dropout=0.1, task_type="CAUSAL_LM", init_lora_weights="gaussian"
    ),
}


@pytest.mark.parametrize("case", list(WRITTEN_BY_PEFT))
def test_what_peft_writes_parses(case, tmp_path):
    LoraConfig(**WRITTEN_BY_PEFT[case]).save_pretrained(tmp_path)
    data = (tmp_path / CONFIG_FILE).read_bytes()
    assert set(json.loads(data)) <= CONFIG_KEYS
    problems: list[str] = []
    config = parse_adapter_config(data, problems)
    assert problems == [] and config is not None
    written = json.loads(data)
    assert config.fields.r == written["r"] and config.fields.lora_alpha == written["lora_alpha"]
    assert config.fields.rank_pattern == written["rank_pattern"]
    assert config.fields.alpha_pattern == written["alpha_pattern"]


MODULES = [
    f"model.layers.{layer}.{kind}"
    for layer in (0, 1, 10, 11)
    for kind in ("self_attn.q_proj", "self_attn.v_proj", "mlp.up_proj", "mlp.down_proj")
]
PATTERNS = {
    # name: a pattern mapping whose first matching key PEFT picks
    "suffixes": {"q_proj": 1, "mlp.up_proj": 2, "proj": 3},
    "dot-is-any-character": {"layers.1.self_attn.q.proj": 4, "up_proj": 5},
    "escaped-and-anchored": {r"layers\.1\.": 6, r"^model\.layers\.1\.mlp\.up_proj": 7},
    "alternation-and-classes": {r"layers\.1[01]?\.(self_attn|mlp)\.(q|up)_proj": 8},
    "order-decides": {"v_proj": 9, r"layers\.0\.self_attn\.v_proj": 10},
    "breaks-out-of-its-group": {"q_proj)|(mlp": 11},
    "nothing-matches": {"o_proj": 12, r"layers\.2\.": 13},
    "optional-groups": {r"(?:mlp\.)?down_proj": 14, r"layers\.(?:1|11)\.self_attn\..*": 15},
}


@pytest.mark.parametrize("case", list(PATTERNS))
def test_pattern_keys_pick_what_peft_picks(case):
    """PEFT runs these keys with Python's `re` (fine here: the test chose them); we run RE2."""
    ranks = PATTERNS[case]
    alphas = {key: 2.5 * rank for key, rank in ranks.items()}
    text = json.dumps(dict(r=64, lora_alpha=32.0, rank_pattern=ranks, alpha_pattern=alphas))
    problems: list[str] = []
    config = parse_adapter_config(text.encode(), problems)
    assert problems == []
    for module in MODULES:
        rank = ranks.get(get_pattern_key(ranks.keys(), module), 64)
        alpha = alphas.get(get_pattern_key(alphas.keys(), module), 32.0)
        assert config.rank(module) == rank, module
        assert config.scale(module, rank) == alpha / rank, module


@pytest.mark.parametrize("key", sorted(UNSUPPORTED_KEYS))
def test_unsupported_features_are_refused_by_name(key):
    text = json.dumps({"r": 4, "lora_alpha": 8, key: True})
    problems: list[str] = []
    assert parse_adapter_config(text.encode(), problems) is None
    assert f"{key} is set: {UNSUPPORTED_KEYS[key]}" in problems


def test_dora_with_a_lora_bias_is_refused_as_peft_refuses_it():
    text = json.dumps({"r": 4, "lora_alpha": 8, "use_dora": True, "lora_bias": True})
    problems: list[str] = []
    assert parse_adapter_config(text.encode(), problems) is None
    assert "use_dora and lora_bias are both set: PEFT trains no lora_B bias with DoRA" in problems
