"""Training the demo: the same recipe writes the same bytes, the base holds exactly what NF4
holds, and what it writes is a model and adapters that loraserve accepts like a user's.

A few steps of a smaller recipe stand in for the default one (whose training and behaviour the
quickstart test checks): these tests are about what gets written, not about how well it learns.
"""

from __future__ import annotations

import json
import random
import warnings
from pathlib import Path

import bitsandbytes.functional as bnb
import pytest
import torch
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM

from loraserve.adapters.manifest import base_fingerprint
from loraserve.adapters.staging import AdapterPublisher
from loraserve.adapters.store import AdapterStore
from loraserve.demo.language import ADAPTERS, BOS, EOS, VOCABULARY
from loraserve.demo.training import (
    IGNORED,
    PROJECTIONS,
    QUANT_BLOCK,
    Recipe,
    fit,
    make_batch,
    snapshot_weights,
    train_demo,
)
from loraserve.model.loading import lora_target_shapes

SMALL = Recipe(
    hidden_size=64,
    layers=1,
    heads=2,
    batch_size=8,
    base_steps=3,
    adapter_steps={name: 2 for name in ADAPTERS},
    check_prompts=8,
)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("demo")
    train_demo(directory, SMALL)
    return directory


def test_a_batch_labels_only_the_answer_and_its_end():
    batch = make_batch(random.Random(0), "reverse", 4, held_out=False)
    for ids, labels, mask in zip(batch.input_ids, batch.labels, batch.attention_mask):
        length = int(mask.sum())
        answer = labels[:length][labels[:length] != IGNORED].tolist()
        prompt = ids[: length - len(answer)].tolist()
        assert prompt[0] == VOCABULARY.index(BOS)
        assert answer[-1] == VOCABULARY.index(EOS)
        assert answer[:-1] == prompt[1:-1][::-1]  # the words, reversed
        assert (labels[length:] == IGNORED).all()


def test_training_for_a_home_not_yet_written_warns_nothing(tmp_path):
    """`loraserve serve` trains in a staging folder, each adapter's config naming the base where
    the folder will be moved: saving them looks nothing up there (PEFT warned, once an adapter,
    that it found no config at that base)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train_demo(tmp_path / "staging", SMALL, home=tmp_path / "home")
    assert [str(w.message) for w in caught if "config file" in str(w.message)] == []


def test_the_same_recipe_writes_the_same_bytes(trained, tmp_path):
    again = tmp_path / "again"
    train_demo(again, SMALL)
    written = sorted(p.relative_to(trained) for p in trained.rglob("*.safetensors"))
    assert len(written) == 1 + len(ADAPTERS)
    for relative in written:
        assert (again / relative).read_bytes() == (trained / relative).read_bytes(), relative


def test_the_base_projections_hold_exactly_nf4_values(trained):
    weights = load_file(trained / "base" / "model.safetensors")
    projections = [k for k in weights if k.split(".")[-2] in PROJECTIONS]
    assert len(projections) == len(PROJECTIONS) * SMALL.layers
    for name in projections:
        packed, state = bnb.quantize_4bit(weights[name], blocksize=QUANT_BLOCK, quant_type="nf4")
        again = bnb.dequantize_4bit(packed, state, blocksize=QUANT_BLOCK, quant_type="nf4")
        assert torch.equal(again, weights[name]), name


def test_the_report_says_what_each_behaviour_measured(trained):
    report = json.loads((trained / "demo.json").read_text())
    assert set(report["trained"]) == {"base", *ADAPTERS}
    assert report["recipe"]["base_steps"] == SMALL.base_steps
    assert all(0.0 <= t["exact_share"] <= 1.0 for t in report["trained"].values())


def test_a_model_that_misses_its_check_trains_every_round_of_every_attempt(trained):
    # A few steps never make a check prompt exact, so nothing stops an adapter early.
    report = json.loads((trained / "demo.json").read_text())
    assert report["trained"]["base"]["steps"] == SMALL.base_rounds * SMALL.base_steps
    for name in ADAPTERS:
        want = SMALL.adapter_attempts * SMALL.adapter_rounds * SMALL.adapter_steps[name]
        assert report["trained"][name]["steps"] == want, name
        assert report["trained"][name]["exact_share"] < SMALL.target_share


def test_a_kept_round_is_not_changed_by_the_rounds_after_it(trained):
    lora = LoraConfig(r=SMALL.rank, lora_alpha=SMALL.alpha, target_modules=list(PROJECTIONS))
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(trained / "base"), lora)
    kept = snapshot_weights(model)
    before = {name: weight.clone() for name, weight in kept.items()}
    fit(model, "reverse", 2, 1e-2, SMALL, random.Random(0))
    assert any(not torch.equal(kept[n], w) for n, w in get_peft_model_state_dict(model).items())
    assert all(torch.equal(kept[name], weight) for name, weight in before.items())


def test_each_adapter_names_its_base_where_the_base_will_be(trained, tmp_path):
    """The demo is written into a staging directory and then moved: the adapters' configs name
    the base at its final home, not in the staging directory."""
    for name in ADAPTERS:
        config = json.loads((trained / "adapters" / name / "adapter_config.json").read_text())
        assert config["base_model_name_or_path"] == str(trained / "base")
    staged, home = tmp_path / "staging", tmp_path / "home"
    train_demo(staged, SMALL, home=home)
    config = json.loads((staged / "adapters" / ADAPTERS[0] / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(home / "base")


def test_loraserve_accepts_the_adapters_for_the_base(trained, tmp_path):
    base = trained / "base"
    fingerprint = base_fingerprint(AutoConfig.from_pretrained(base).to_dict(), "nf4")
    publisher = AdapterPublisher(AdapterStore(tmp_path / "store"), fingerprint,
                                 lora_target_shapes(str(base)), max_rank=64)  # fmt: skip
    for name in ADAPTERS:
        manifest = publisher.publish_dir("demo", name, trained / "adapters" / name)
        assert manifest.rank == SMALL.rank
        assert set(manifest.target_modules) == set(PROJECTIONS)
