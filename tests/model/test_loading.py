"""Loading the base model: what each quantization really yields, on the CPU's bnb constraints."""

from __future__ import annotations

import json
import logging
import shutil

import bitsandbytes as bnb
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from loraserve.model.int8_output import Int8Linear
from loraserve.model.linear import amx_tiles, bf16_pairs, cpu_vendor
from loraserve.model.loading import bf16_compute_hint, load_base_model
from loraserve.model.tiny import write_tiny_model

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
IDS = torch.tensor([[5, 17, 42, 99, 3]])


def _projections(model) -> dict[str, nn.Module]:
    return {
        name: module
        for name, module in model.named_modules()
        if name.rsplit(".", 1)[-1] in PROJECTIONS
    }


def _greedy(loaded, new_tokens: int = 6) -> list[int]:
    out = loaded.model.generate(
        IDS,
        attention_mask=torch.ones_like(IDS),
        max_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=loaded.tokenizer.pad_token_id,
    )
    return out[0, IDS.shape[1] :].tolist()


@pytest.fixture(scope="module")
def model_96(tmp_path_factory):
    """A llama whose MLP width (96) the CPU 4-bit kernel cannot take as in-features."""
    return write_tiny_model(tmp_path_factory.mktemp("m96") / "llama96", intermediate_size=96)


@pytest.fixture(scope="module")
def saved_nf4(model_dirs, model_96, tmp_path_factory):
    """name -> directory of an nf4 model saved already quantized, with its tokenizer."""
    root = tmp_path_factory.mktemp("prequantized")
    dirs = {}
    for name, source in (("llama", model_dirs["llama"]), ("llama96", model_96)):
        loaded = load_base_model(str(source), "nf4", "fp32", "cpu")
        loaded.model.save_pretrained(root / name)
        loaded.tokenizer.save_pretrained(root / name)
        dirs[name] = root / name
    return dirs


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_nf4_quantizes_every_projection_and_keeps_lm_head(arch, model_dirs):
    loaded = load_base_model(str(model_dirs[arch]), "nf4", "fp32", "cpu")

    assert loaded.quantization == "nf4"
    assert loaded.unquantized_layers == ()
    assert loaded.compute_dtype == torch.float32
    assert loaded.device == torch.device("cpu")
    projections = _projections(loaded.model)
    assert len(projections) == 2 * len(PROJECTIONS)
    for name, module in projections.items():
        assert isinstance(module, bnb.nn.Linear4bit), name
        assert module.weight.quant_state.quant_type == "nf4", name
    assert not isinstance(loaded.model.lm_head, bnb.nn.Linear4bit)
    assert loaded.output_projection == "fp32"
    assert not loaded.model.training
    assert not any(p.requires_grad for p in loaded.model.parameters())


@pytest.mark.parametrize(
    ("quantization", "layer_type", "quant_type"),
    [("fp4", bnb.nn.Linear4bit, "fp4"), ("int8", bnb.nn.Linear8bitLt, None)],
)
def test_fp4_and_int8_quantize_the_projections_and_generate(
    quantization, layer_type, quant_type, model_dirs
):
    loaded = load_base_model(str(model_dirs["llama"]), quantization, "fp32", "cpu")
    q_proj = loaded.model.model.layers[0].self_attn.q_proj
    assert loaded.quantization == quantization and isinstance(q_proj, layer_type)
    if quant_type is not None:
        assert q_proj.weight.quant_type == quant_type
    assert not isinstance(loaded.model.lm_head, layer_type)
    out = loaded.model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 6)


def test_none_gives_plain_linear_layers_with_the_checkpoint_weights(model_dirs):
    loaded = load_base_model(str(model_dirs["llama"]), "none", "fp32", "cpu")
    checkpoint = load_file(model_dirs["llama"] / "model.safetensors")

    assert loaded.quantization == "none"
    assert loaded.unquantized_layers == ()
    for name, module in _projections(loaded.model).items():
        assert type(module) is nn.Linear, name
        assert torch.equal(module.weight, checkpoint[f"{name}.weight"]), name


def test_nf4_weights_are_the_checkpoint_weights_within_one_nf4_step(model_dirs):
    loaded = load_base_model(str(model_dirs["llama"]), "nf4", "fp32", "cpu")
    checkpoint = load_file(model_dirs["llama"] / "model.safetensors")

    for name, module in _projections(loaded.model).items():
        weight = module.weight
        restored = bnb.functional.dequantize_4bit(weight.data, weight.quant_state)
        want = checkpoint[f"{name}.weight"]
        assert restored.shape == want.shape, name
        # NF4 levels are at most 0.304 apart (on [-1, 1]), scaled by each 64-block's absmax.
        blocks_want = want.reshape(-1, 64)
        error = (restored.reshape(-1, 64) - blocks_want).abs()
        bound = 0.16 * blocks_want.abs().amax(dim=1, keepdim=True)
        assert (error <= bound).all(), name
        assert error.max() > 0, f"{name} was not quantized"


def test_bf16_compute_dtype_is_applied(model_dirs, caplog):
    caplog.set_level(logging.INFO, logger="loraserve.model.loading")
    loaded = load_base_model(str(model_dirs["llama"]), "none", "bf16", "cpu")
    assert loaded.compute_dtype == torch.bfloat16
    assert loaded.model.lm_head.weight.dtype == torch.bfloat16
    assert "--compute-dtype bf16" not in caplog.text  # already bf16: nothing to suggest


def test_fp32_on_a_cpu_where_bf16_measured_faster_suggests_bf16_compute(model_dirs, caplog):
    caplog.set_level(logging.INFO, logger="loraserve.model.loading")
    load_base_model(str(model_dirs["llama"]), "none", "fp32", "cpu")
    faster = bf16_compute_hint(amx_tiles(), bf16_pairs(), cpu_vendor()) is not None
    assert ("--compute-dtype bf16" in caplog.text) == faster


@pytest.mark.parametrize(
    ("tiles", "pairs", "vendor", "speed"),
    [
        (True, False, "GenuineIntel", "twice"),
        (False, True, "AuthenticAMD", "1.6 times"),
        (False, True, "GenuineIntel", None),  # pair dot products no faster than fp32's FMAs
        (False, False, "AuthenticAMD", None),
        (False, True, "", None),
    ],
)
def test_bf16_is_suggested_only_where_it_was_measured_faster(tiles, pairs, vendor, speed):
    hint = bf16_compute_hint(tiles, pairs, vendor)
    assert (hint is None) == (speed is None)
    assert speed is None or f"about {speed} as fast" in hint


def test_nf4_keeps_cpu_misfit_layers_unquantized_and_generates(model_96):
    loaded = load_base_model(str(model_96), "nf4", "fp32", "cpu")
    plain = load_base_model(str(model_96), "none", "fp32", "cpu")

    misfits = ("model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj")
    assert loaded.quantization == "nf4"
    assert sorted(loaded.unquantized_layers) == list(misfits)
    for name, module in _projections(loaded.model).items():
        if name in misfits:
            assert type(module) is nn.Linear, name
            assert module.weight.dtype == torch.float32
            assert torch.equal(module.weight, plain.model.get_submodule(name).weight)
        else:
            assert isinstance(module, bnb.nn.Linear4bit), name
    tokens = _greedy(loaded)
    assert len(tokens) == 6 and all(0 <= t < 512 for t in tokens)
    with torch.no_grad():
        assert torch.isfinite(loaded.model(IDS).logits).all()


@pytest.mark.parametrize("requested", ["nf4", "none"])
def test_prequantized_checkpoint_is_served_as_saved(requested, saved_nf4, model_dirs):
    loaded = load_base_model(str(saved_nf4["llama"]), requested, "fp32", "cpu")
    original = load_base_model(str(model_dirs["llama"]), "nf4", "fp32", "cpu")

    assert loaded.quantization == "nf4"
    for name, module in _projections(loaded.model).items():
        assert isinstance(module, bnb.nn.Linear4bit), name
    with torch.no_grad():
        assert torch.equal(loaded.model(IDS).logits, original.model(IDS).logits)
    assert loaded.tokenizer.encode("LoRA adapts") == original.tokenizer.encode("LoRA adapts")


def test_prequantized_checkpoint_with_misfits_keeps_them_linear(saved_nf4):
    loaded = load_base_model(str(saved_nf4["llama96"]), "nf4", "fp32", "cpu")
    assert loaded.quantization == "nf4"
    assert type(loaded.model.model.layers[0].mlp.down_proj) is nn.Linear
    assert isinstance(loaded.model.model.layers[0].mlp.up_proj, bnb.nn.Linear4bit)
    assert len(_greedy(loaded)) == 6


def test_prequantized_checkpoint_reports_its_unquantized_layers(saved_nf4):
    loaded = load_base_model(str(saved_nf4["llama96"]), "nf4", "fp32", "cpu")
    assert sorted(loaded.unquantized_layers) == [
        "model.layers.0.mlp.down_proj",
        "model.layers.1.mlp.down_proj",
    ]


def test_checkpoint_quantized_by_another_method_is_refused(model_dirs, tmp_path):
    directory = shutil.copytree(model_dirs["llama"], tmp_path / "gptq")
    config = json.loads((directory / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"'gptq'.*bitsandbytes"):
        load_base_model(str(directory), "nf4", "fp32", "cpu")


@pytest.mark.parametrize(
    ("quantization", "dtype", "named"),
    [
        ("q4", "fp32", ("'q4'", "nf4", "fp4", "int8", "none")),
        ("NF4", "fp32", ("'NF4'", "nf4", "fp4", "int8", "none")),
        ("", "fp32", ("''", "nf4", "none")),
        ("nf4", "float32", ("'float32'", "fp32", "bf16", "fp16")),
        ("none", "int8", ("'int8'", "fp32", "bf16", "fp16")),
    ],
)
def test_bad_quantization_or_dtype_names_the_allowed_values(quantization, dtype, named, tmp_path):
    # The directory does not exist: the names must be checked before anything is read.
    with pytest.raises(ValueError) as excinfo:
        load_base_model(str(tmp_path / "absent"), quantization, dtype, "cpu")
    for word in named:
        assert word in str(excinfo.value)


@pytest.mark.parametrize(("quantization", "double_quant"), [("nf4", False), ("fp4", True)])
def test_quantize_output_holds_the_output_projection_as_bitsandbytes_quantizes_it(
    quantization, double_quant, model_dirs
):
    plain = load_base_model(str(model_dirs["llama"]), quantization, "fp32", "cpu", double_quant)
    loaded = load_base_model(
        str(model_dirs["llama"]), quantization, "fp32", "cpu", double_quant, quantize_output="4bit"
    )
    head = loaded.model.get_output_embeddings()
    assert isinstance(head, bnb.nn.Linear4bit)
    assert loaded.output_projection == quantization
    state = head.weight.quant_state
    assert (state.quant_type, state.nested, state.blocksize) == (quantization, double_quant, 64)
    original = plain.model.get_output_embeddings().weight
    packed, want = bnb.functional.quantize_4bit(
        original, blocksize=64, compress_statistics=double_quant, quant_type=quantization
    )
    assert torch.equal(head.weight.data, packed)
    restored = bnb.functional.dequantize_4bit(head.weight.data, state)
    assert torch.equal(restored, bnb.functional.dequantize_4bit(packed, want))
    assert restored.shape == original.shape and not torch.equal(restored, original)
    for name, module in _projections(loaded.model).items():  # the rest as without it
        assert torch.equal(module.weight.data, plain.model.get_submodule(name).weight.data), name


def _as_quantized(weight: torch.Tensor, quantize_output: str) -> torch.Tensor:
    """`weight` [out, in] as the output projection of that format holds it, dequantized."""
    if quantize_output == "4bit":
        return bnb.functional.dequantize_4bit(
            *bnb.functional.quantize_4bit(weight, blocksize=64, quant_type="nf4")
        )
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    linear.weight = nn.Parameter(weight.detach().clone())
    return Int8Linear.quantize(linear).dequantized()


def _dequantized_head(head: nn.Module) -> torch.Tensor:
    if isinstance(head, Int8Linear):
        return head.dequantized()
    head.support_avx512bf16_for_cpu = False  # fp32 arithmetic on every CPU
    return bnb.functional.dequantize_4bit(head.weight.data, head.weight.quant_state)


@pytest.mark.parametrize("quantize_output", ["4bit", "int8"])
def test_quantize_output_of_a_tied_model_leaves_the_input_embedding_whole(
    quantize_output, tmp_path
):
    model = write_tiny_model(tmp_path / "tied", tie_word_embeddings=True)
    plain = load_base_model(str(model), "nf4", "fp32", "cpu")
    loaded = load_base_model(str(model), "nf4", "fp32", "cpu", quantize_output=quantize_output)
    embedding = loaded.model.get_input_embeddings().weight
    assert torch.equal(embedding, plain.model.get_input_embeddings().weight)
    restored = _dequantized_head(loaded.model.get_output_embeddings())
    assert torch.equal(restored, _as_quantized(embedding, quantize_output))
    with torch.no_grad():
        hidden = loaded.model.model(IDS).last_hidden_state
        assert torch.allclose(loaded.model(IDS).logits, hidden @ restored.T, atol=1e-4)


@pytest.mark.parametrize("quantization", ["nf4", "none"])
def test_quantize_output_int8_holds_the_output_projection_as_codes_and_row_scales(
    quantization, model_dirs
):
    plain = load_base_model(str(model_dirs["llama"]), quantization, "fp32", "cpu")
    loaded = load_base_model(
        str(model_dirs["llama"]), quantization, "fp32", "cpu", quantize_output="int8"
    )
    head = loaded.model.get_output_embeddings()
    assert isinstance(head, Int8Linear) and loaded.output_projection == "int8"
    want = Int8Linear.quantize(plain.model.get_output_embeddings())
    assert torch.equal(head.weight, want.weight) and torch.equal(head.scales, want.scales)
    for name, module in _projections(loaded.model).items():  # the rest as without it
        assert torch.equal(module.weight.data, plain.model.get_submodule(name).weight.data), name


@pytest.mark.parametrize(
    ("quantize_output", "device", "refusal"),
    [("int8", "cuda", "int8 runs on CPUs"), ("8bit", "cpu", "must be one of")],
)
def test_quantize_output_refuses_what_it_cannot_hold(quantize_output, device, refusal, model_dirs):
    with pytest.raises(ValueError, match=refusal):
        load_base_model(str(model_dirs["llama"]), "nf4", "fp32", device,
                        quantize_output=quantize_output)  # fmt: skip


@pytest.mark.parametrize("quantization", ["int8", "none"])
def test_quantize_output_is_refused_where_it_does_not_apply(quantization, model_dirs):
    with pytest.raises(ValueError, match="quantize_output 4bit applies to nf4 and fp4"):
        load_base_model(str(model_dirs["llama"]), quantization, "fp32", "cpu",
                        quantize_output="4bit")  # fmt: skip


def test_quantize_output_leaves_a_vocabulary_the_cpu_cannot_quantize_and_says_so(tmp_path, caplog):
    model = write_tiny_model(tmp_path / "v500", vocab_size=500)
    loaded = load_base_model(str(model), "nf4", "fp32", "cpu", quantize_output="4bit")
    assert type(loaded.model.get_output_embeddings()) is nn.Linear
    assert loaded.output_projection == "fp32"
    assert "quantize_output" in caplog.text and "500 x 128" in caplog.text
