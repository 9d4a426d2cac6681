"""Reading the other kinds of adapter PEFT saves (DoRA, embedding LoRA, biases), and refusing
files whose tensors and config disagree, each problem named."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from tests.conftest import KIND_SPECS, write_adapter

from loraserve.adapters.peft_format import CONFIG_FILE, WEIGHTS_FILE, read_peft_adapter
from loraserve.adapters.peft_tensors import (
    CheckedModule,
    module_weights,
    nonfinite_reference,
    pair_factors_reference,
    stored_pairs_reference,
    tensor_role,
)
from loraserve.model.kernels import native
from loraserve.model.loading import lora_target_shapes
from loraserve.model.tiny import write_tiny_model
from loraserve.types import AdapterIncompatibleError, InvalidAdapterError

SPECS = {spec.name: spec for spec in KIND_SPECS}
Q0 = "model.layers.0.self_attn.q_proj"
EMBED = "model.embed_tokens"


@pytest.mark.parametrize(
    ("name", "role"),
    [
        (f"base_model.model.{Q0}.lora_A.weight", (Q0, "lora_A")),
        (f"base_model.model.{Q0}.lora_B.default.weight", (Q0, "lora_B")),
        (f"base_model.model.{Q0}.lora_B.bias", (Q0, "lora_bias")),
        (f"base_model.model.{Q0}.lora_magnitude_vector", (Q0, "magnitude")),
        (f"base_model.model.{Q0}.lora_magnitude_vector.default.weight", (Q0, "magnitude")),
        (f"base_model.model.{Q0}.base_layer.bias", (Q0, "bias")),
        (f"base_model.model.{Q0}.bias", (Q0, "bias")),
        (f"base_model.model.{EMBED}.lora_embedding_A", (EMBED, "lora_embedding_A")),
        (f"base_model.model.{EMBED}.lora_embedding_B.default", (EMBED, "lora_embedding_B")),
        (f"base_model.model.{EMBED}.base_layer.weight", (EMBED, "base_copy")),
        (f"base_model.model.{Q0}.weight", None),  # a full base weight: modules_to_save's kind
        (f"base_model.model.{Q0}.lora_A.bias", None),
        (f"base_model.model.{EMBED}.lora_embedding_A.weight", None),
        ("lm_head.weight", None),
    ],
)
def test_each_tensor_name_peft_saves_has_its_role(name, role):
    assert tensor_role(name) == role


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("kinds")
    return {arch: write_tiny_model(root / arch, arch) for arch in ("llama", "qwen2")}


def _written(bases, tmp_path, arch: str, spec: str):
    return write_adapter(bases[arch], tmp_path / spec, SPECS[spec], seed=3)


def test_a_dora_adapter_on_the_embedding_reads_with_its_magnitudes(bases, tmp_path):
    directory = _written(bases, tmp_path, "llama", "dora-embed-r4")
    weights = read_peft_adapter(
        directory, lora_target_shapes(str(bases["llama"])), 8, torch.float32
    )
    embed = weights.modules[EMBED]
    assert embed.embedding and embed.a.shape == (4, 512) and embed.b.shape == (4, 128)
    assert embed.magnitude.shape == (128,) and embed.base_copy.shape == (512, 128)
    k_proj = weights.modules["model.layers.1.self_attn.k_proj"]
    assert not k_proj.embedding and k_proj.magnitude.shape == (64,)
    assert all(not m.resolved for m in weights.modules.values())


def test_trained_biases_read_on_the_modules_that_have_them(bases, tmp_path):
    directory = _written(bases, tmp_path, "qwen2", "lora-bias-r4")
    weights = read_peft_adapter(
        directory, lora_target_shapes(str(bases["qwen2"])), 8, torch.float32
    )
    q_proj = weights.modules[Q0]
    assert q_proj.bias.shape == (128,) and q_proj.lora_bias.shape == (128,)
    assert weights.modules["model.layers.0.self_attn.o_proj"].bias is None  # o_proj has none


def _edit(directory, config=None, tensors=None):
    if config:
        path = directory / CONFIG_FILE
        path.write_text(json.dumps({**json.loads(path.read_text()), **config}))
    if tensors:
        data = load_file(directory / WEIGHTS_FILE)
        tensors(data)
        save_file(data, directory / WEIGHTS_FILE)


REFUSALS = {
    # name: (spec, edit, error, substrings)
    "magnitude-without-use-dora": (
        "dora-r8",
        lambda d: _edit(d, config={"use_dora": False}),
        InvalidAdapterError,
        [Q0, "has a lora_magnitude_vector, but use_dora is false"],
    ),
    "bias-without-config": (
        "lora-bias-r4",
        lambda d: _edit(d, config={"bias": "none"}),
        InvalidAdapterError,
        [Q0, "has a trained bias, but bias is 'none'"],
    ),
    "magnitude-of-the-wrong-size": (
        "dora-r8",
        lambda d: _edit(
            d,
            tensors=lambda t: t.update(
                {f"base_model.model.{Q0}.lora_magnitude_vector": torch.ones(7)}
            ),
        ),
        AdapterIncompatibleError,
        [Q0, "lora_magnitude_vector is (7,), the base module has 128 outputs"],
    ),
    "embedding-copy-of-another-vocabulary": (
        "embed-r4",
        lambda d: _edit(
            d,
            tensors=lambda t: t.update(
                {f"base_model.model.{EMBED}.base_layer.weight": torch.zeros(600, 128)}
            ),
        ),
        AdapterIncompatibleError,
        [EMBED, "the saved base embedding is (600, 128)"],
    ),
    "magnitude-alone": (
        "dora-r8",
        lambda d: _edit(
            d,
            tensors=lambda t: [t.pop(f"base_model.model.{Q0}.lora_{kind}.weight") for kind in "AB"],
        ),
        InvalidAdapterError,
        [Q0, "lora_magnitude_vector without lora_A and lora_B"],
    ),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_tensors_and_config_that_disagree_are_refused(case, bases, tmp_path):
    spec, edit, error, substrings = REFUSALS[case]
    arch = "qwen2" if "bias" in spec else "llama"
    directory = _written(bases, tmp_path, arch, spec)
    edit(directory)
    with pytest.raises(error) as raised:
        read_peft_adapter(directory, lora_target_shapes(str(bases[arch])), 8, torch.float32)
    message = str(raised.value) + " ".join(raised.value.problems)
    for substring in substrings:
        assert substring in message


def _with_values(size: int, where: dict[int, float], dtype=torch.float32) -> torch.Tensor:
    t = torch.randn(size, generator=torch.Generator().manual_seed(size)).to(dtype)
    for i, value in where.items():
        t[i] = value
    return t


# Sizes around the kernel's blocking (8 or 16 lanes, 4 vectors per step) and a B of the
# benchmark; values that are finite however large or small, and each kind of non-finite one at
# the start, inside a block, and in the tail past the last vector.
FINITE_EDGES = {0: 3.4e38, 1: -3.4e38, 2: 1e-45, 3: -0.0}
NONFINITE_CASES = [
    (size, {at % size: value})
    for size in (1, 7, 8, 9, 63, 64, 65, 71, 16 * 2816)
    for at in (0, 37, size - 1)
    for value in (float("nan"), float("inf"), float("-inf"))
]


def test_compiled_nonfinite_equals_the_torch_reference():
    if native() is None:
        pytest.skip("no compiled kernels for this CPU")
    tensors = [_with_values(4, FINITE_EDGES), torch.empty(0), torch.zeros(3, 5)]
    tensors += [_with_values(size, where) for size, where in NONFINITE_CASES]
    tensors += [_with_values(size, {}) for size in (1, 7, 65, 16 * 1024)]
    want = list(range(3, 3 + len(NONFINITE_CASES)))
    assert nonfinite_reference(tensors) == want
    assert native().nonfinite(tensors) == want


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_module_weights_names_each_module_holding_a_nan_or_infinity_once(dtype):
    """fp32: the compiled pass (where built); bf16: torch's. A B that is finite as stored but
    not once scaled counts too."""

    def module(a_bad: float | None = None, b_bad: float | None = None, scale: float = 2.0):
        a = _with_values(4 * 8, {} if a_bad is None else {5: a_bad}).view(4, 8)
        b = _with_values(6 * 4, {} if b_bad is None else {23: b_bad}).view(6, 4)
        return CheckedModule({"lora_A": a, "lora_B": b}, False, (8, 6), scale)

    checked = {
        "fine": module(),
        "nan-in-a": module(a_bad=float("nan")),
        "inf-in-both": module(float("inf"), float("-inf")),
        "huge-but-finite": module(b_bad=3e38, scale=1.0),
        "infinite-once-scaled": module(b_bad=3e38),
    }
    converted = module_weights(checked, dtype)
    assert converted.not_finite == ["nan-in-a", "inf-in-both", "infinite-once-scaled"]
    assert list(converted.modules) == list(checked)


@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_pairs_stored_in_16_bits_are_held_as_stored_and_checked_once_scaled(half):
    """Under fp32 compute a plain pair stored in bf16 or fp16 stays in its dtype, B transposed
    but not scaled (the slot write scales it), contiguous, all in one buffer; a pair is still
    refused when it holds a NaN or an infinity as stored, or when B times the scaling leaves
    float32's range. Pairs with other terms, or under bf16 compute, are converted as before."""
    big, fp32_max = float(torch.finfo(half).max), torch.finfo(torch.float32).max

    def module(a_bad=None, b_bad=None, scale=2.0, **terms):
        a = _with_values(4 * 8, {} if a_bad is None else {5: a_bad}, half).view(4, 8)
        b = _with_values(6 * 4, {} if b_bad is None else {23: b_bad}, half).view(6, 4)
        return CheckedModule({"lora_A": a, "lora_B": b, **terms}, False, (8, 6), scale)

    checked = {
        "fine": module(),
        "nan-in-a": module(a_bad=float("nan")),
        "inf-in-b": module(b_bad=float("-inf")),
        "largest-finite": module(b_bad=-big, scale=1.0),
        "infinite-once-scaled": module(b_bad=big, scale=2 * fp32_max / big),
        "dora": module(magnitude=torch.ones(6)),
        "mixed": CheckedModule(
            {"lora_A": module().parts["lora_A"], "lora_B": torch.ones(6, 4)}, False, (8, 6), 2.0
        ),
    }
    converted = module_weights(checked, torch.float32)
    assert converted.not_finite == ["nan-in-a", "inf-in-b", "infinite-once-scaled"]
    for name in ("fine", "largest-finite"):
        got, parts = converted.modules[name], checked[name].parts
        assert got.unscaled and got.a.dtype == got.b.dtype == half
        assert got.stored_half == half
        assert torch.equal(got.a, parts["lora_A"]) and torch.equal(got.b, parts["lora_B"].t())
        assert got.a.is_contiguous() and got.b.is_contiguous()
    dora, mixed = converted.modules["dora"], converted.modules["mixed"]
    assert not dora.unscaled and dora.b.dtype == torch.float32
    assert dora.stored_half == half  # its a and b / scaling hold values of that dtype
    assert not mixed.unscaled and mixed.stored_half is None
    assert torch.equal(dora.b, checked["dora"].parts["lora_B"].float().t() * 2.0)
    storages = {m.a.untyped_storage().data_ptr() for m in converted.modules.values() if m.unscaled}
    assert len(storages) == 1
    in_bf16 = module_weights({"fine": checked["fine"]}, torch.bfloat16).modules["fine"]
    assert not in_bf16.unscaled


@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_compiled_stored_pairs_equal_the_torch_path(half):
    """The same bits (a copy and a transposition, nothing scaled), every pair a view of one
    buffer, and the same pairs flagged: a NaN or an infinity anywhere in A or B, and a B whose
    largest magnitude times the scaling overflows float32 (either side of the edge, either
    sign of the scaling); any strides."""
    if native() is None:
        pytest.skip("no compiled kernels for this CPU")
    big = float(torch.finfo(half).max)
    edge = torch.finfo(torch.float32).max / big  # scalings past this overflow the largest B
    shapes = [(16, 1024, 2816), (8, 13, 9), (3, 7, 1), (4, 64, 65), (1, 1, 1), (2, 5, 130)]
    a_parts = [torch.randn(r, fan_in).to(half) for r, fan_in, _ in shapes]
    b_parts = [torch.randn(fan_out, r).to(half) for r, _, fan_out in shapes]
    scales = [0.37 * (i + 1) for i in range(len(shapes))]
    a_parts.append(torch.randn(9, 4).to(half).t())  # strided A and B
    b_parts.append(torch.randn(4, 12).to(half).t())
    scales.append(-2.0)
    for size, where in NONFINITE_CASES[::4]:
        a_parts += [_with_values(size, where, half).view(1, size), torch.randn(1, size).to(half)]
        b_parts += [torch.randn(3, 1).to(half), _with_values(size, where, half).view(size, 1)]
        scales += [1.5, 0.5]
    for scale in (edge * 0.999, edge * 1.001, -edge * 1.001, 1.0):
        a_parts.append(torch.randn(2, 9).to(half))
        b_parts.append(_with_values(18, {17: -big}, half).view(9, 2))
        scales.append(scale)
    got = native().lora_pairs_16(a_parts, b_parts, scales)
    want = stored_pairs_reference(a_parts, b_parts, scales)
    assert got[2] == want.not_finite and len(want.not_finite) == len(NONFINITE_CASES[::4]) * 2 + 2
    for name, got_part, want_part in (("A", got[0], want.a), ("B", got[1], want.b)):
        assert len(got_part) == len(want_part) == len(a_parts), name
        for g, w in zip(got_part, want_part):
            assert g.dtype == half and g.is_contiguous() and g.shape == w.shape, name
            assert torch.equal(g.view(torch.int16), w.view(torch.int16)), name
    assert len({t.untyped_storage().data_ptr() for t in (*got[0], *got[1])}) == 1


def test_an_adapter_stored_in_16_bits_takes_half_the_host_bytes(bases, tmp_path):
    """What the host tier counts for an adapter saved in bf16 or fp16 is what its pairs take
    as stored: half of the same adapter read in float32, and no more than the file's tensors."""
    directory = _written(bases, tmp_path, "llama", "embed-r4")
    targets = lora_target_shapes(str(bases["llama"]))
    wide = read_peft_adapter(directory, targets, 8, torch.float32)
    tensors = load_file(directory / WEIGHTS_FILE)
    for half in (torch.bfloat16, torch.float16):
        save_file({n: t.to(half) for n, t in tensors.items()}, directory / WEIGHTS_FILE)
        narrow = read_peft_adapter(directory, targets, 8, torch.float32)
        projections = [n for n, m in narrow.modules.items() if not m.embedding]
        assert projections and all(narrow.modules[n].unscaled for n in projections)
        assert not narrow.modules[EMBED].unscaled  # the embedding's slots fold the scaling
        assert sum(
            narrow.modules[n].a.nbytes + narrow.modules[n].b.nbytes for n in projections
        ) * 2 == sum(wide.modules[n].a.nbytes + wide.modules[n].b.nbytes for n in projections)
        assert narrow.nbytes < wide.nbytes


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_compiled_pair_factors_equal_the_torch_path(dtype):
    """The same bits (a copy, one float32 multiply, for bf16 compute rounded to nearest even),
    every pair a view of one buffer, and the same pairs flagged: non-finite values at the edges
    of the blocks and tiles, in A or B, as stored, once scaled, or once rounded to bf16; any
    stored dtype and strides."""
    if native() is None:
        pytest.skip("no compiled kernels for this CPU")
    shapes = [(16, 1024, 2816), (8, 13, 9), (3, 7, 1), (4, 64, 65), (1, 1, 1)]  # r, in, out
    a_parts = [torch.randn(r, fan_in) for r, fan_in, _ in shapes]
    b_parts = [torch.randn(fan_out, r) for r, _, fan_out in shapes]
    a_parts += [torch.randn(4, 40).to(torch.bfloat16), torch.randn(40, 4).t()]
    b_parts += [torch.randn(12, 4).to(torch.float16), torch.randn(4, 12).t()]
    for size, where in NONFINITE_CASES[::4]:
        a_parts += [_with_values(size, where).view(1, size), torch.randn(1, size)]
        b_parts += [torch.randn(3, 1), _with_values(size, where).view(size, 1)]
    a_parts.append(torch.randn(2, 9))
    b_parts.append(_with_values(18, {17: 3e38}).view(9, 2))  # finite until scaled
    rounding = {0: 3.3e38, 1: 3.4e38, 2: 1e-40, 3: 1.00390625, 4: 1.01171875}  # overflow, ties
    a_parts.append(_with_values(8, rounding).view(1, 8))  # finite until rounded to bf16
    b_parts.append(torch.randn(5, 1))
    scales = [0.37 * (i + 1) for i in range(len(a_parts) - 1)] + [1.0]
    got = native().lora_factors(a_parts, b_parts, scales, dtype)
    want = pair_factors_reference(a_parts, b_parts, scales, dtype)
    flagged = len(NONFINITE_CASES[::4]) * 2 + 1 + (dtype == torch.bfloat16)
    assert got[2] == want.not_finite and len(want.not_finite) == flagged
    for name, got_part, want_part in (("A", got[0], want.a), ("B", got[1], want.b)):
        assert len(got_part) == len(want_part) == len(a_parts), name
        for g, w in zip(got_part, want_part):
            assert g.dtype == dtype and g.is_contiguous() and g.shape == w.shape, name
            torch.testing.assert_close(g, w, rtol=0, atol=0, equal_nan=True, msg=name)
    assert len({t.untyped_storage().data_ptr() for t in (*got[0], *got[1])}) == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("spec", ["dora-embed-r4", "lora-bias-r4"])
def test_read_weights_hold_no_memory_beyond_their_tensors(spec, dtype, bases, tmp_path):
    arch = "qwen2" if spec == "lora-bias-r4" else "llama"
    directory = _written(bases, tmp_path, arch, spec)
    weights = read_peft_adapter(directory, lora_target_shapes(str(bases[arch])), 8, dtype)
    names = ("a", "b", "magnitude", "bias", "lora_bias", "base_copy", "scale", "shift")
    tensors = [
        t
        for module in weights.modules.values()
        for t in (getattr(module, n) for n in names)
        if t is not None
    ]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    # the host tier's budget counts each storage once, whole, and no storage holds more than
    # these tensors: A is not a view of the file's buffer, which would keep B as stored alive
    assert weights.nbytes == sum(storages.values()) == sum(t.nbytes for t in tensors)
