"""Golden parity of the reported log-probabilities and of logit bias against HF PEFT.

In a mixed batch (adapters and the base, greedy and sampled), every token's reported
log-probability and its top alternatives must equal `log_softmax` of PEFT's logits for the
same adapter at the same position (teacher-forced over our tokens), within the logit tolerance
of the golden parity test; the alternatives are PEFT's most likely tokens up to ties within
that tolerance. A request with a logit bias must pick, at every greedy step, the argmax of
PEFT's logits plus exactly that bias, while its reported log-probabilities stay those of the
raw logits.
"""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from tests.engine.helpers import load_reference_base, make_core, run
from tests.engine.test_parity import DEVICES, LOGIT_TOLERANCE

from loraserve.types import GenerateRequest, SamplingParams, TokenBias

pytestmark = pytest.mark.slow  # PEFT forwards per request

ADAPTERS = ("r8-all", "r64-all", "r32-kv-up", None)
PROMPTS = ("LoRA adapts a frozen base model", "The quick brown fox", "Café, naïve 🙂", "0123")
MAX_NEW = 8


def reference(core, model_dir, adapter_dirs, request, tokens, quantization) -> torch.Tensor:
    """[len(tokens), V] float32 on the CPU: PEFT's logits each of `tokens` was chosen from,
    `request.adapter` alone, on the core's device."""
    prompt = core.tokenizer.encode(request.prompt)
    loaded = load_reference_base(model_dir, quantization, "fp32", str(core.device))
    model = loaded.model
    if request.adapter is not None:
        model = PeftModel.from_pretrained(model, adapter_dirs[request.adapter])
    with torch.no_grad():
        logits = model(torch.tensor([prompt + tokens], device=loaded.device)).logits[0]
    return logits[len(prompt) - 1 : -1].float().cpu()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("quantization", ["nf4", "none"])
def test_top_logprobs_equal_peft_log_softmax(quantization, device, model_dirs, adapter_dirs):
    tolerance = 2 * LOGIT_TOLERANCE[quantization, "fp32"]  # a log_softmax moves by twice that
    model_dir = model_dirs["llama"]
    core = make_core(model_dir, quantization, device=device, max_step_tokens=64)
    for name in filter(None, ADAPTERS):
        core.adapters.load(name, adapter_dirs["llama"][name])
    requests = [
        GenerateRequest(
            prompt=prompt,
            adapter=adapter,
            sampling=SamplingParams(
                max_new_tokens=MAX_NEW, top_logprobs=n, temperature=temperature, seed=i
            ),
        )
        for i, (prompt, adapter, n, temperature) in enumerate(
            zip(PROMPTS, ADAPTERS, (5, 20, 1, 3), (0.0, 0.8, 0.0, 1.2))
        )
    ]
    results = run(core, {0: requests[:2], 1: requests[2:]})

    for request, got in zip(requests, results):
        want = reference(core, model_dir, adapter_dirs["llama"], request, got.tokens, quantization)
        want = want.log_softmax(dim=-1)
        n = request.sampling.top_logprobs
        for step, (token, logprob, top) in enumerate(
            zip(got.tokens, got.logprobs, got.top_logprobs)
        ):
            assert abs(logprob - want[step, token].item()) <= tolerance, (request.adapter, step)
            assert len(top) == n
            ids = [t.token_id for t in top]
            ours = torch.tensor([t.logprob for t in top])
            assert (ours[:-1] >= ours[1:]).all(), "not most likely first"
            assert (ours - want[step, ids]).abs().max() <= tolerance, (request.adapter, step)
            nth_best = want[step].topk(n).values[-1]
            assert (want[step, ids] >= nth_best - tolerance).all(), "not the most likely"
            assert [t.text for t in top] == [core.tokenizer.decode([i]) for i in ids]


def test_logit_bias_adds_exactly_its_values_before_the_greedy_choice(model_dirs, adapter_dirs):
    tolerance = LOGIT_TOLERANCE["nf4", "fp32"]
    model_dir = model_dirs["llama"]
    core = make_core(model_dir, "nf4")
    core.adapters.load("r8-all", adapter_dirs["llama"]["r8-all"])
    plain = GenerateRequest(
        prompt=PROMPTS[1],
        adapter="r8-all",
        sampling=SamplingParams(max_new_tokens=MAX_NEW, ignore_eos=True, logprobs=True),
    )
    [unbiased] = run(core, {0: [plain]})
    first = unbiased.tokens[0]
    bias = {first: -100.0, 100: 7.5, 200: 6.0, 300: -3.0}  # the first choice is banned
    biased_request = GenerateRequest(
        prompt=plain.prompt,
        adapter=plain.adapter,
        sampling=SamplingParams(
            max_new_tokens=MAX_NEW,
            ignore_eos=True,
            logprobs=True,
            logit_bias=tuple(TokenBias(t, b) for t, b in bias.items()),
        ),
    )
    [biased] = run(core, {0: [biased_request]})
    assert biased.tokens[0] != first

    raw = reference(core, model_dir, adapter_dirs["llama"], plain, biased.tokens, "nf4")
    shift = torch.zeros(raw.shape[1])
    shift[list(bias)] = torch.tensor(list(bias.values()))
    for step, token in enumerate(biased.tokens):
        scores = raw[step] + shift
        best = scores.argmax().item()
        assert (scores[best] - scores[token]).item() <= tolerance, f"step {step}"
        raw_logprob = raw[step].log_softmax(dim=-1)[token].item()
        assert abs(biased.logprobs[step] - raw_logprob) <= 2 * tolerance
