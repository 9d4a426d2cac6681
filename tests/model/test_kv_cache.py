"""Ragged batches through the paged KV cache against full forwards.

The runner's logits for a row must equal, to fp32 rounding, the logits an unbatched full forward
of that row's whole sequence gives at the same position: whatever its neighbours in the batch,
its prompt split into chunks, or its positions straddling KV blocks scattered across the pool.
"""

from __future__ import annotations

import random

import pytest
import torch
from tests.model.runner_steps import prefill_and_decode

from loraserve.model import attention
from loraserve.model import kv_cache as kv_cache_module
from loraserve.model import runner as runner_module
from loraserve.model.blocks import BlockAllocator
from loraserve.model.kernels import native
from loraserve.model.kv_cache import PagedKVCache, quantize_heads
from loraserve.model.loading import load_base_model
from loraserve.model.lora import LoraContext
from loraserve.model.runner import ModelRunner, RowInput

BLOCK_SIZE = 4
SEQ_LEN = 24
LOGIT_TOLERANCE = 1e-5  # fp32, unquantized


@pytest.mark.parametrize(
    ("dtype", "head_bytes"), [(torch.float32, 16 * 4), (torch.bfloat16, 16 * 2), (torch.int8, 20)]
)
def test_bytes_per_token_counts_keys_and_values_of_every_layer(dtype, head_bytes):
    """A head of 16: its elements, and for int8 codes their float32 scale."""
    cache = PagedKVCache(3, 5, BLOCK_SIZE, 2, 16, dtype, torch.device("cpu"))
    assert cache.bytes_per_token() == 2 * 3 * 2 * head_bytes
    assert cache.key_pools[0].shape == (5 * BLOCK_SIZE, 2, 16)
    assert cache.dtype == dtype
    scales = cache.key_scales + cache.value_scales
    assert [s.shape for s in scales] == ([(5 * BLOCK_SIZE, 2)] * 6 if dtype == torch.int8 else [])


def test_a_16_bit_pool_holds_each_written_key_rounded_to_it():
    """fp32 states written into an fp16 pool (the kernel's path on this CPU, index_copy_
    elsewhere) hold what torch's rounding gives."""
    cache = PagedKVCache(1, 3, BLOCK_SIZE, 2, 16, torch.float16, torch.device("cpu"))
    keys, values = torch.randn(2, 1, 2, 5, 16).unbind(0)  # [1, kv_heads, N, head_dim] each
    slots = torch.tensor([4, 9, 10, 1, 7])
    cache.prepare(slots)
    returned_keys, returned_values = cache.update(keys, values, 0)
    assert returned_keys is keys and returned_values is values
    pools = cache.pools(0)
    assert torch.equal(pools.keys[slots], keys[0].transpose(0, 1).half())
    assert torch.equal(pools.values[slots], values[0].transpose(0, 1).half())
    assert pools.key_scales is None and pools.value_scales is None


@pytest.mark.parametrize("kernels", ["compiled", "torch"])
@pytest.mark.parametrize("states_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_an_int8_pool_holds_each_written_head_as_codes_and_a_scale(
    kernels, states_dtype, monkeypatch
):
    """States written into an int8 cache (by the compiled quantizer, or torch's where it does
    not run) hold `quantize_heads`' codes and scales; a block copied for the prefix cache takes
    its scales along; every reader gets codes times scales."""
    if kernels == "torch":
        monkeypatch.setattr(kv_cache_module, "native", lambda: None)
    elif native() is None:
        pytest.skip("no compiled kernels here")
    cache = PagedKVCache(2, 4, BLOCK_SIZE, 2, 16, torch.int8, torch.device("cpu"))
    keys, values = (torch.randn(2, 1, 2, 5, 16) * 3).to(states_dtype).unbind(0)
    slots = torch.tensor([4, 9, 10, 1, 7])
    cache.prepare(slots)
    cache.update(keys, values, 1)
    pools = cache.pools(1)
    for pool, scales, states in ((pools.keys, pools.key_scales, keys),
                                 (pools.values, pools.value_scales, values)):  # fmt: skip
        codes, head_scales = quantize_heads(states[0].transpose(0, 1))
        assert torch.equal(pool[slots], codes) and torch.equal(scales[slots], head_scales)
    assert not cache.pools(0).keys.any() and not cache.pools(0).key_scales.any()
    for read, states in zip(pools.gathered(slots, torch.float32), (keys, values), strict=True):
        codes, head_scales = quantize_heads(states[0].transpose(0, 1))
        assert torch.equal(read, codes.float() * head_scales.unsqueeze(-1))
    cache.copy_block(2, 3, 3)  # positions 8-10 to 12-14
    assert torch.equal(pools.keys[12:15], pools.keys[8:11])
    assert torch.equal(pools.value_scales[12:15], pools.value_scales[8:11])
    assert pools.value_scales[9:11].all()  # slots 9 and 10 written


# Kernels against torch paths over the same int8 pools: fp32 logits measured 2.2e-6 apart at
# most, bf16 0.059 (2026-12-06).
@pytest.mark.parametrize(("compute", "tolerance"), [("fp32", 1e-4), ("bf16", 0.2)])
def test_int8_pools_give_the_torch_paths_logits_under_fp32_and_bf16_compute(
    compute, tolerance, model_dirs, monkeypatch
):
    """A prefill and decode steps over int8 pools by the compiled kernels (the quantizing write,
    decode and prefill attention) and by the torch paths (quantize_heads, the gathered contexts
    read back as codes times scales): the same logits up to the summation order (bf16: and
    where that order moves a rounding). In fp32 both are far from the unquantized cache's: the
    comparison would see a path that skipped the quantization."""
    if native() is None:
        pytest.skip("no compiled kernels here")
    model_dir = model_dirs["qwen2"]  # grouped-query attention: two q heads a kv head
    _, kernels = prefill_and_decode(model_dir, "none", compute=compute, kv_dtype=torch.int8)
    _, unquantized = prefill_and_decode(model_dir, "none", compute=compute)
    monkeypatch.setattr(runner_module, "paged_kernels_apply", lambda cache: False)
    monkeypatch.setattr(kv_cache_module, "native", lambda: None)
    runner, torch_paths = prefill_and_decode(model_dir, "none", compute=compute,
                                             kv_dtype=torch.int8)  # fmt: skip
    assert not runner.paged_kernels and runner.cache.dtype == torch.int8
    for step, (got, want) in enumerate(zip(kernels, torch_paths, strict=True)):
        diff = (got - want).abs().max().item()
        assert diff <= tolerance, f"step {step}: {diff}"
    if compute == "fp32":
        moved = max((w - u).abs().max().item() for w, u in zip(torch_paths, unquantized))
        assert moved > 10 * tolerance, moved


class _Layer(torch.nn.Module):
    layer_idx = 0


@pytest.mark.parametrize("pool_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_a_new_prompt_attends_over_its_own_states_as_over_its_gathered_context(pool_dtype):
    """Prefill rows with no earlier positions, by the torch path (no kernel tables): the output
    equals, bit for bit, SDPA over the context gathered from the pools (the forward's own keys
    and values where the pools hold them exactly; the pools' rounded values where they are
    narrower)."""
    heads, kv_heads, head_dim, counts = 4, 2, 16, (5, 3)
    cache = PagedKVCache(1, 6, BLOCK_SIZE, kv_heads, head_dim, pool_dtype, torch.device("cpu"))
    tokens = sum(counts)
    tables = (torch.tensor([2, 3]), torch.tensor([1]))  # row 0 straddles two blocks
    slots = torch.tensor([8, 9, 10, 11, 12, 4, 5, 6])
    # [1, N, heads, D] seen as [1, heads, N, D], as a projection's output reaches attention
    query = torch.randn(1, tokens, heads, head_dim).transpose(1, 2)
    key, value = (torch.randn(1, tokens, kv_heads, head_dim).transpose(1, 2) for _ in range(2))
    cache.prepare(slots)
    cache.update(key, value, 0)
    rows = (
        attention.PrefillRow(0, counts[0], 0, tables[0]),
        attention.PrefillRow(counts[0], counts[1], 0, tables[1]),
    )
    batch = attention.AttentionBatch(cache, None, rows)
    got, _ = attention.paged_attention(_Layer(), query, key, value, None, attention_batch=batch)
    q = query[0].transpose(0, 1)  # [N, heads, D]
    pools = cache.pools(0)
    for row in rows:
        span = slice(row.first, row.first + row.count)
        read = batch.read_slots(row)
        assert torch.equal(read, slots[span])
        assert batch.read_slots(row) is read
        k, v = pools.gathered(read, torch.float32)
        want = attention.attend_context(q[span], k, v, 0, 0, head_dim**-0.5)
        assert torch.equal(got[0, span], want)


def test_prefill_rows_past_the_kernels_limit_for_their_dtype_go_to_sdpa(monkeypatch):
    """The split is by chunk length and the queries' dtype, decided once per forward; the
    kernel's tables keep its rows' entries in order."""
    monkeypatch.setitem(attention.KERNEL_MAX_CHUNK, torch.float32, 5)
    cache = PagedKVCache(1, 8, BLOCK_SIZE, 2, 8, torch.float32, torch.device("cpu"))
    counts, starts = [3, 10, 4], [0, 2, 9]
    firsts = [0, 3, 13]
    tables = torch.tensor([[1, 0, 0], [2, 3, 4], [5, 6, 7]])
    rows = tuple(
        attention.PrefillRow(f, c, s, t) for f, c, s, t in zip(firsts, counts, starts, tables)
    )
    kernel_tables = attention.PrefillTables(
        torch.tensor(firsts), torch.tensor(counts), torch.tensor(starts), tables.int()
    )
    batch = attention.AttentionBatch(cache, None, rows, kernel_tables)
    split = batch.prefill_split(torch.float32)
    assert split.sdpa == (rows[1],)
    assert split.kernel is not None
    assert split.kernel.firsts.tolist() == [0, 13] and split.kernel.counts.tolist() == [3, 4]
    assert split.kernel.starts.tolist() == [0, 9]
    assert torch.equal(split.kernel.block_tables, tables[[0, 2]].int())
    assert batch.prefill_split(torch.float32) is split
    wide = batch.prefill_split(torch.bfloat16)  # 16-bit queries: the limit of 16-bit chunks
    assert wide.kernel is kernel_tables and wide.sdpa == ()
    no_kernel = attention.AttentionBatch(cache, None, rows)
    assert no_kernel.prefill_split(torch.float32) == attention.PrefillSplit(None, rows)


# ---- ModelRunner over the paged cache ------------------------------------------------------


class Harness:
    """One unquantized model, a paged cache with spare blocks, and sequences with full logits."""

    def __init__(self, model_dir, num_seqs: int, spare_blocks: int = 3, seed: int = 0) -> None:
        loaded = load_base_model(str(model_dir), "none", "fp32", "cpu")
        self.model = loaded.model
        config = self.model.config
        per_seq = -(-SEQ_LEN // BLOCK_SIZE)
        num_blocks = 1 + num_seqs * per_seq + spare_blocks
        self.cache = PagedKVCache(
            config.num_hidden_layers,
            num_blocks,
            BLOCK_SIZE,
            config.num_key_value_heads,
            config.hidden_size // config.num_attention_heads,
            torch.float32,
            torch.device("cpu"),
        )
        self.runner = ModelRunner(self.model, self.cache, LoraContext(), [0])
        # Scatter each sequence's blocks across the pool, out of order.
        rng = random.Random(seed)
        blocks = BlockAllocator(num_blocks, BLOCK_SIZE).allocate(num_seqs * per_seq)
        rng.shuffle(blocks)
        self.tables = [blocks[i * per_seq : (i + 1) * per_seq] for i in range(num_seqs)]
        self.spare = sorted(set(range(1, num_blocks)) - set(blocks))
        gen = torch.Generator().manual_seed(seed)
        vocab = config.vocab_size
        self.seqs = [
            torch.randint(3, vocab, (SEQ_LEN,), generator=gen).tolist() for _ in range(num_seqs)
        ]
        with torch.no_grad():
            self.full = [
                self.model(torch.tensor([s])).logits[0].float() for s in self.seqs
            ]  # [L, V]
        self.rng = rng

    def step(self, feeds: dict[int, tuple[int, int]]) -> dict[int, torch.Tensor]:
        """feeds: sequence -> (start, count), rows in shuffled order; returns logits by sequence."""
        order = list(feeds)
        self.rng.shuffle(order)
        rows = [
            RowInput(self.seqs[i][start : start + n], start, self.tables[i])
            for i, (start, n) in ((i, feeds[i]) for i in order)
        ]
        out = self.runner.forward(rows)  # [B, V]
        assert out.shape == (len(rows), self.model.config.vocab_size)
        assert out.dtype == torch.float32
        return {i: out[k] for k, i in enumerate(order)}

    def check(self, logits: dict[int, torch.Tensor], last: dict[int, int]) -> None:
        for i, row in logits.items():
            diff = (row - self.full[i][last[i]]).abs().max().item()
            assert diff <= LOGIT_TOLERANCE, f"sequence {i} at position {last[i]}: {diff}"

    def assert_spare_blocks_untouched(self) -> None:
        for pool in self.cache.key_pools + self.cache.value_pools:
            for block in self.spare:
                assert not pool[block * BLOCK_SIZE : (block + 1) * BLOCK_SIZE].any()


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_ragged_prefill_then_decode_matches_full_forward(arch, model_dirs):
    prompts = [3, 9, 6, 1, 4]  # 9 and 6 straddle blocks at once; 3 and 4 cross while decoding
    h = Harness(model_dirs[arch], len(prompts))
    pos = dict(enumerate(prompts))

    logits = h.step({i: (0, n) for i, n in pos.items()})
    h.check(logits, {i: p - 1 for i, p in pos.items()})
    for _ in range(7):
        logits = h.step({i: (p, 1) for i, p in pos.items()})
        h.check(logits, pos)
        pos = {i: p + 1 for i, p in pos.items()}
    h.assert_spare_blocks_untouched()


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_gathered_decode_matches_full_forward_building_its_context_once_a_step(
    arch, model_dirs, monkeypatch
):
    """Decode rows by the torch path (CUDA's, and the CPU's for pools the kernels do not take):
    the same logits, and the padded batch's pool slots and mask built by the first layer that
    asks, once per window, and shared by every other layer."""
    monkeypatch.setattr(runner_module, "paged_kernels_apply", lambda cache: False)
    windows: list[int] = []
    build = attention.decode_context

    def counted(tables, lens, block_size, window, longest, dtype):
        windows.append(window)
        return build(tables, lens, block_size, window, longest, dtype)

    monkeypatch.setattr(attention, "decode_context", counted)
    prompts = [3, 9, 6, 2]
    h = Harness(model_dirs[arch], len(prompts), seed=3)
    pos = dict(enumerate(prompts))
    h.step({i: (0, n) for i, n in pos.items()})
    assert windows == []  # prefill rows gather their own context
    for _ in range(5):
        windows.clear()
        logits = h.step({i: (p, 1) for i, p in pos.items()})
        h.check(logits, pos)
        assert windows and len(windows) == len(set(windows)), windows
        pos = {i: p + 1 for i, p in pos.items()}
    h.assert_spare_blocks_untouched()


@pytest.mark.parametrize("paths", ["kernels", "torch", "both"])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_chunked_prefill_mixed_with_decode_matches_full_forward(
    arch, paths, model_dirs, monkeypatch
):
    """Prefill chunks after earlier ones (their context partly in the pools) beside decode
    rows: by the paged kernels where they run here, by the torch paths (SDPA per row over its
    gathered context, CUDA's path), and by both in one forward (chunks past the kernel's limit,
    lowered to 5 tokens here, take SDPA)."""
    if paths == "torch":
        monkeypatch.setattr(runner_module, "paged_kernels_apply", lambda cache: False)
    elif native() is None:
        pytest.skip("no compiled kernels here")
    if paths == "both":
        monkeypatch.setitem(attention.KERNEL_MAX_CHUNK, torch.float32, 5)
    h = Harness(model_dirs[arch], 3, seed=1)
    assert h.runner.paged_kernels == (paths != "torch")
    # Sequence 0's prompt of 11 tokens arrives in chunks of 6 and 5, the first ending mid-block,
    # next to sequence 1's prefill and then its decode, and sequence 2 joining late.
    steps = [
        {0: (0, 6), 1: (0, 5)},
        {0: (6, 5), 1: (5, 1)},
        {0: (11, 1), 1: (6, 1), 2: (0, 7)},
        {0: (12, 1), 1: (7, 1), 2: (7, 1)},
        {0: (13, 1), 1: (8, 1), 2: (8, 3)},  # a 3-token chunk after decoding
    ]
    for feeds in steps:
        logits = h.step(feeds)
        h.check(logits, {i: start + n - 1 for i, (start, n) in feeds.items()})
    h.assert_spare_blocks_untouched()


def test_prompt_in_chunks_equals_one_prefill(model_dirs):
    h = Harness(model_dirs["llama"], 2, seed=2)
    h.seqs[1], h.full[1] = h.seqs[0], h.full[0]  # the same tokens, in another block table
    whole = h.step({0: (0, SEQ_LEN)})[0]
    for start in range(0, SEQ_LEN, 5):
        chunked = h.step({1: (start, min(5, SEQ_LEN - start))})[1]
    h.check({0: whole, 1: chunked}, {0: SEQ_LEN - 1, 1: SEQ_LEN - 1})
