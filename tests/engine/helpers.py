"""Drive an EngineCore step by step and collect what each request emitted."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import bitsandbytes as bnb
import torch

from loraserve.config import EngineConfig
from loraserve.engine.core import EngineCore
from loraserve.model.loading import LoadedModel, load_base_model
from loraserve.types import FinalEvent, GenerateRequest, SamplingParams, TokenEvent, TopLogprob

# Prompts of different lengths, scripts and bytes per token, for batches of up to seven.
PROMPTS = ["LoRA adapts a frozen", "The quick brown fox", "Café, naïve", "def forward(self):",
           "QLoRA stores the base", "0123456789 + - *", "多语言文本"]  # fmt: skip


@dataclass
class Collected:
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[float | None] = field(default_factory=list)
    top_logprobs: list[tuple[TopLogprob, ...]] = field(default_factory=list)
    logits: list[torch.Tensor] = field(default_factory=list)  # [V] per generated token
    final: FinalEvent | None = None
    error: Exception | None = None

    def __call__(self, event) -> None:
        if isinstance(event, TokenEvent):
            self.tokens.append(event.token_id)
            self.text += event.text
            self.logprobs.append(event.logprob)
            self.top_logprobs.append(event.top_logprobs)
        elif isinstance(event, FinalEvent):
            self.final = event
        else:
            self.error = event


def requests_on(adapters: list[str | None], new_tokens: int) -> list[GenerateRequest]:
    """One request per adapter (None: the base), each on its own of PROMPTS, generating exactly
    `new_tokens`."""
    sampling = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    return [
        GenerateRequest(prompt=prompt, adapter=adapter, sampling=sampling)
        for prompt, adapter in zip(PROMPTS, adapters)
    ]


def make_core(
    model_dir, quantization="nf4", dtype="fp32", device="cpu", store=None, drafter=None,
    **overrides,
) -> EngineCore:  # fmt: skip
    settings = dict(
        device=device, device_slots=8, max_rank=64, kv_cache_tokens=4096, max_context=512
    )
    settings.update(overrides)
    config = EngineConfig(**settings)
    loaded = load_base_model(
        str(model_dir), quantization, dtype, device, config.double_quant, config.quantize_output
    )
    return EngineCore(loaded, config, store=store, drafter=drafter)


def load_reference_base(
    model_dir, quantization="nf4", dtype="fp32", device="cpu", double_quant=False,
    quantize_output="off",
) -> LoadedModel:  # fmt: skip
    """The base as the PEFT references load it, computing in `dtype` on every CPU.

    On CPUs with AVX512-BF16, bitsandbytes' CPU Linear4bit repacks its weight and computes in
    bf16 whatever the compute dtype (its input and block scales rounded to bf16): a reference
    that is 1e-2 off the fp32 result. Turned off here, it dequantizes and multiplies in `dtype`,
    as it does on every other CPU, so one tolerance holds everywhere.
    """
    loaded = load_base_model(
        str(model_dir), quantization, dtype, device, double_quant, quantize_output
    )
    for module in loaded.model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
    return loaded


@contextmanager
def recording_logits(core: EngineCore, collected: dict[int, Collected]):
    """While open, `core` keeps the logits each request's tokens were chosen from (a drafting
    request's rows past the tokens it emitted are dropped)."""
    original = core._sample_and_emit

    def sample_and_emit(seqs, logits, masks=None, drafts=None):
        rows, drafted = iter(logits), drafts or {}
        per_seq = {
            seq.request_id: [next(rows).clone() for _ in [0, *drafted.get(seq.request_id, [])]]
            for seq in seqs
        }
        before = {seq.request_id: len(collected[seq.request_id].tokens) for seq in seqs}
        original(seqs, logits, masks, drafts)
        for request_id, kept in per_seq.items():
            emitted = len(collected[request_id].tokens) - before[request_id]
            collected[request_id].logits.extend(kept[:emitted])

    core._sample_and_emit = sample_and_emit
    try:
        yield
    finally:
        del core._sample_and_emit


def run(core: EngineCore, arrivals: dict[int, list[GenerateRequest]], max_steps: int = 500):
    """Add arrivals[s] before step s; step until idle. Returns Collected per request, in order.

    Every adapter load a step asks for finishes before the next step, as on an idle machine:
    which rows share a step then never depends on how fast the loader thread ran, so two runs
    of the same arrivals batch the same rows (and, computing the same sums, give the same
    bits) however busy the machine is."""
    results: dict[int, Collected] = {}
    order: list[int] = []
    step = 0
    with recording_logits(core, results):
        while step <= max(arrivals) or core.has_work():
            for request in arrivals.get(step, []):
                sink = Collected()
                request_id = core.add_request(request, sink)
                results[request_id] = sink
                order.append(request_id)
            if core.has_work():
                core.step()
                assert core.adapters.wait_for_loads(timeout=60)
            step += 1
            assert step < max_steps, "engine did not finish"
    return [results[i] for i in order]
