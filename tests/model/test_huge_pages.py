"""Long-lived host tensors on 2 MiB pages (`model/huge_pages.py`).

What goes there and what does not, that the kernel is asked for huge pages for exactly the
tensor's whole 2 MiB runs, that the memory goes when the tensor does, and that a runner whose
KV pools and output projection live there computes the logits it computes without them. Where
the kernel is read (`/proc/self/smaps`), the tests skip unless transparent huge pages are in
`madvise` mode (in `always` mode every mapping is eligible, so nothing tells them apart).
"""

from __future__ import annotations

import gc
import json
from pathlib import Path

import pytest
import torch
from tests.model.runner_steps import BLOCK_TOKENS, prefill_and_decode
from torch import nn

from loraserve.model import huge_pages
from loraserve.model.lora import LoraContext, MultiLoraLinear
from loraserve.model.runner import ModelRunner
from loraserve.model.tiny import write_tiny_model

HUGE = huge_pages.HUGE_PAGE


def madvise_mode() -> bool:
    try:
        return "[madvise]" in huge_pages.THP_MODE.read_text()
    except OSError:
        return False


needs_madvise = pytest.mark.skipif(
    not (madvise_mode() and huge_pages.available()),
    reason="transparent huge pages are not in madvise mode here",
)


def mapping_of(address: int) -> dict[str, str] | None:
    """The /proc/self/smaps fields of the mapping that holds `address`, or None."""
    fields: dict[str, str] | None = None
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split(" ", 1)[0]
        if "-" in head and ":" not in head:
            low, high = (int(bound, 16) for bound in head.split("-"))
            if fields is not None:
                return fields
            if low <= address < high:
                fields = {}
        elif fields is not None:
            key, _, value = line.partition(":")
            fields[key] = value.strip()
    return fields


def eligible_for_huge_pages(address: int) -> bool:
    fields = mapping_of(address)
    return fields is not None and fields.get("THPeligible") == "1"


@needs_madvise
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_zeros_asks_for_huge_pages_for_its_whole_runs_only(dtype):
    """2 MiB-aligned; the kernel may back its first two 2 MiB runs with huge pages, and its
    last, partial run stays on 4 KiB pages (a 2 MiB page there would be mostly waste)."""
    element = torch.empty((), dtype=dtype).element_size()
    shape = (5, HUGE // element // 2 - 3)  # 2.5 MiB less a few elements
    t = huge_pages.zeros(shape, dtype)
    assert t.shape == shape and t.dtype == dtype and not t.any()
    start = t.data_ptr()
    assert start % HUGE == 0
    assert eligible_for_huge_pages(start) and eligible_for_huge_pages(start + 2 * HUGE - 1)
    assert not eligible_for_huge_pages(start + t.nbytes - 1)
    t[-1, -1] = 7  # the tail is ordinary writable memory
    assert t.sum().item() == 7


@pytest.mark.parametrize(
    ("shape", "device", "switch"),
    [((HUGE // 4 - 1,), "cpu", None), ((HUGE // 4,), "meta", None), ((HUGE // 4,), "cpu", "off")],
    ids=["under-2MiB", "not-the-cpu", "switched-off"],
)
def test_what_is_not_eligible_is_a_plain_tensor(shape, device, switch, monkeypatch):
    if switch is not None:
        monkeypatch.setenv(huge_pages.SWITCH, switch)
    assert not huge_pages.eligible(shape, torch.float32, device)
    t = huge_pages.zeros(shape, torch.float32, device)
    assert t.shape == shape and t.device.type == device
    if device == "cpu":
        assert not t.any()
        if madvise_mode():
            assert not eligible_for_huge_pages(t.data_ptr())


def test_a_refused_mapping_gives_a_plain_tensor(monkeypatch, caplog):
    """Out of mappings (vm.max_map_count) or refused by the kernel: ordinary zeros, a warning."""

    def refuse(*args, **kwargs):
        raise OSError(12, "Cannot allocate memory")

    monkeypatch.setattr(huge_pages.mmap, "mmap", refuse)
    monkeypatch.setattr(huge_pages, "available", lambda: True)
    t = huge_pages.zeros((2, HUGE // 4), torch.float32)
    assert t.shape == (2, HUGE // 4) and not t.any()
    assert "huge pages refused" in caplog.text


@needs_madvise
def test_the_mapping_goes_with_the_tensor():
    t = huge_pages.zeros((3, HUGE // 4), torch.float32)
    address = t.data_ptr()
    assert eligible_for_huge_pages(address)
    del t
    gc.collect()
    assert not eligible_for_huge_pages(address)


def test_lora_slots_of_2_mib_and_more_are_on_huge_pages():
    layer = MultiLoraLinear(nn.Linear(1024, 4096), LoraContext(), 8, 16, torch.float32)
    assert layer.lora_b.nbytes == HUGE and layer.lora_a.nbytes == HUGE // 4
    assert not layer.lora_b.any()
    if huge_pages.available():
        assert layer.lora_b.data_ptr() % HUGE == 0
        if madvise_mode():
            assert eligible_for_huge_pages(layer.lora_b.data_ptr())
            assert not eligible_for_huge_pages(layer.lora_a.data_ptr())


def test_adopt_parameters_moves_large_float_weights_keeping_ties():
    """Small ones and packed (quantized) bytes stay; a tied weight moves once."""
    torch.manual_seed(0)
    model = nn.Module()
    model.embed = nn.Embedding(4096, 256)  # 4 MiB
    model.head = nn.Linear(256, 4096, bias=False)
    model.head.weight = model.embed.weight  # tied
    model.small = nn.Linear(16, 16)
    packed = torch.randint(0, 255, (HUGE * 2,), dtype=torch.uint8)
    model.packed = nn.Parameter(packed, requires_grad=False)
    before = {name: (p.data_ptr(), p.detach().clone()) for name, p in model.named_parameters()}
    moved = huge_pages.adopt_parameters(model)
    assert model.head.weight is model.embed.weight
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name][1]), name
    assert model.small.weight.data_ptr() == before["small.weight"][0]
    assert model.packed.data_ptr() == before["packed"][0]
    if not huge_pages.available():
        assert moved == 0
        return
    assert moved == 4096 * 256 * 4
    assert model.embed.weight.data_ptr() % HUGE == 0
    if madvise_mode():
        assert eligible_for_huge_pages(model.embed.weight.data_ptr())


@pytest.mark.parametrize("quantization", ["nf4", "none"])
def test_a_runner_on_huge_pages_gives_the_logits_it_gives_without(quantization, tmp_path,
                                                                  monkeypatch):  # fmt: skip
    """KV pools of 3 MiB and an output projection of 2 MiB on huge pages: the logits of a
    prefill and four decode steps are those of the same runner without them."""
    model_dir = write_tiny_model(tmp_path / "model", "llama", vocab_size=4096)
    config = json.loads((model_dir / "config.json").read_text())
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    position_bytes = config["num_key_value_heads"] * head_dim * 4  # fp32
    blocks = -(-3 * HUGE // (position_bytes * BLOCK_TOKENS))  # pools of 3 MiB

    def run() -> tuple[ModelRunner, list[torch.Tensor]]:
        return prefill_and_decode(model_dir, quantization, num_blocks=blocks)

    runner, got = run()
    head = runner.model.get_output_embeddings().module.weight  # 4096 x 128 fp32: 2 MiB
    if huge_pages.available():
        pools = runner.cache.pools(0)
        for tensor in (pools.keys, pools.values, head):
            assert tensor.data_ptr() % HUGE == 0
            if madvise_mode():
                assert eligible_for_huge_pages(tensor.data_ptr())
    monkeypatch.setenv(huge_pages.SWITCH, "off")
    plain, want = run()
    if madvise_mode():
        assert not eligible_for_huge_pages(plain.cache.pools(0).keys.data_ptr())
    for step, (g, w) in enumerate(zip(got, want)):
        assert torch.equal(g, w), f"step {step}"
