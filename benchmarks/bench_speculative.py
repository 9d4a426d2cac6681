"""A few streams' decode with drafted tokens (`speculative_tokens`): what checking k drafted
tokens in the decode step gives where the drafts are right, and costs where they are wrong.

Builds a random base of the benchmark's shapes (`--model`), one engine without drafts and one
with `speculative_tokens` = `--draft`, and runs `--streams` greedy requests (the benchmark's
random prompts, `--new-tokens` each) through each configuration in turn, rounds alternating:

  plain        the engine without drafts: one token a step
  lookup       the engine's prompt lookup (on a random model, whose output seldom repeats
               its context, it mostly finds nothing to draft: the cost of looking)
  right_<c>    drafts of k tokens whose first c are what `plain` generated next and the rest
               are not: each step keeps c drafted tokens and emits c + 1 (right_0: every draft
               wrong, the cost of checking k tokens for nothing; right_<k>: every draft right)

Drafts that are right c tokens at a time stand in for a workload whose text repeats its context
that often: a real drafter's acceptance comes from the `loraserve_draft_tokens` counters.
With `--demo` the model is the built-in demo's trained base (`loraserve.demo`: it answers a
prompt of words by repeating them) and the workload `--requests` held-out prompts of 10 words
one after another, 10 new tokens each: prompt lookup on a trained model whose output copies
its input (its home ground), on a model small enough that a step is mostly host work.
Reports generated tokens per second (median of `--repeats` rounds), each over `plain`, the
tokens each step emitted per stream, and whether every configuration generated `plain`'s tokens.

    .venv/bin/python benchmarks/bench_speculative.py --out benchmarks/results/speculative.json
    .venv/bin/python benchmarks/bench_speculative.py --model tinyllama-1.1b \\
        --checkpoint-dtype bf16 --compute-dtype bf16 --new-tokens 48 --repeats 2
    .venv/bin/python benchmarks/bench_speculative.py --demo --requests 32 --draft 4
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch

from bench_multi_lora import BASES, DEFAULT, make_workload
from common import DEFAULT_CACHE_DIR, Workload, prepare_model
from engine_runs import KV_BLOCK_SIZE, Trace, step_until_idle, submit
from loraserve.config import EngineConfig
from loraserve.demo import demo_model
from loraserve.demo.language import MAX_WORDS, build_tokenizer, sample_words
from loraserve.engine.core import EngineCore
from loraserve.engine.sequence import Sequence
from loraserve.model.loading import load_base_model
from machine import machine_info


class ReplayDrafts:
    """Drafts the reference's next tokens (`reference`: prompt -> what `plain` generated), the
    first `right` of each draft as they are and the rest changed to another token."""

    def __init__(self, vocab: int) -> None:
        self.vocab = vocab
        self.reference: dict[tuple[int, ...], list[int]] = {}
        self.right = 0

    def propose(self, seq: Sequence, limit: int) -> list[int]:
        ahead = self.reference[tuple(seq.token_ids[: seq.prompt_len])]
        ahead = ahead[seq.num_generated : seq.num_generated + limit]
        return ahead[: self.right] + [(t + 1) % self.vocab for t in ahead[self.right :]]


def engine(settings: EngineConfig, drafter: ReplayDrafts | None = None) -> EngineCore:
    loaded = load_base_model(
        settings.model, settings.quantization, settings.compute_dtype, settings.device
    )
    return EngineCore(loaded, settings, drafter=drafter)


def run(core: EngineCore, waves: list[Workload]) -> tuple[float, Trace]:
    """Each wave's requests together, the waves one after another."""
    trace = Trace()
    start = time.perf_counter()
    for wave in waves:
        submit(core, trace, wave, with_adapters=False)
        step_until_idle(core, trace)
    return time.perf_counter() - start, trace


def demo_waves(requests: int) -> tuple[Path, list[Workload]]:
    """The demo base and `requests` distinct held-out prompts of MAX_WORDS words, one a wave:
    each answer is its prompt's words again, MAX_WORDS tokens."""
    tokenizer = build_tokenizer()
    rng = random.Random(0)
    prompts: dict[tuple[int, ...], None] = {}
    while len(prompts) < requests:
        words = sample_words(rng, "base", held_out=True)
        if len(words) == MAX_WORDS:
            prompts[tuple(tokenizer(" ".join(words))["input_ids"])] = None
    return demo_model().base, [Workload((prompt,), ("",), MAX_WORDS) for prompt in prompts]


def drafted(core: EngineCore) -> tuple[float, float]:
    sample = core.metrics.registry.get_sample_value
    return (
        sample("loraserve_draft_tokens_total", {"result": "accepted"}) or 0.0,
        sample("loraserve_draft_tokens_total", {"result": "rejected"}) or 0.0,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(BASES), default="default")
    parser.add_argument("--checkpoint-dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--compute-dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--streams", type=int, default=1)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--draft", type=int, default=4, help="speculative_tokens")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--demo", action="store_true", help="the demo's base and prompts")
    parser.add_argument("--requests", type=int, default=16, help="with --demo")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    if args.demo:
        model_dir, waves = demo_waves(args.requests)
        vocab = len(build_tokenizer())
        args.streams, args.new_tokens = 1, MAX_WORDS
    else:
        spec = replace(BASES[args.model], weights_dtype=args.checkpoint_dtype)
        model_dir = prepare_model(spec, DEFAULT_CACHE_DIR)
        config = replace(DEFAULT, model=spec, num_requests=args.streams, new_tokens=args.new_tokens)
        waves = [make_workload(config, [""] * args.streams)]
        vocab = spec.vocab_size
    prompts = [prompt for wave in waves for prompt in wave.prompts]
    longest = max(len(p) for p in prompts) + args.new_tokens
    settings = EngineConfig(
        model=str(model_dir),
        compute_dtype=args.compute_dtype,
        max_batch_size=args.streams,
        kv_cache_tokens=args.streams * (longest + KV_BLOCK_SIZE),
        max_context=longest,
        prefix_caching=False,  # every run feeds its whole prompts
    )
    drafts = ReplayDrafts(vocab)
    plain = engine(settings)
    drafting_settings = settings.model_copy(
        update=dict(speculative_tokens=args.draft, speculative_max_rows=args.streams)
    )
    drafting = engine(drafting_settings, drafts)
    looking = engine(drafting_settings)

    _, reference = run(plain, waves)  # also the warm-up
    drafts.reference = {prompt: reference.token_ids[i] for i, prompt in enumerate(prompts)}
    rights = sorted({0, 1, args.draft // 2, args.draft})
    configs = ["plain", "lookup", *(f"right_{c}" for c in rights)]
    cores = {"plain": plain, "lookup": looking, **{f"right_{c}": drafting for c in rights}}
    seconds: dict[str, list[float]] = {name: [] for name in configs}
    steps: dict[str, int] = {}
    identical: dict[str, bool] = {}
    acceptance: dict[str, tuple[float, float]] = {}
    for round_ in range(args.repeats + 1):  # round 0 warms every configuration up
        order = configs if round_ % 2 == 0 else configs[::-1]
        for name in order:
            if name.startswith("right_"):
                drafts.right = int(name.removeprefix("right_"))
            before = drafted(cores[name])
            took, trace = run(cores[name], waves)
            after = drafted(cores[name])
            if round_:
                seconds[name].append(took)
            steps[name] = len(trace.step_seconds)
            acceptance[name] = (after[0] - before[0], after[1] - before[1])
            identical[name] = identical.get(name, True) and trace.token_ids == reference.token_ids
            print(f"round {round_} {name:10s} {took:6.2f} s "
                  f"{trace.tokens / took:7.1f} tok/s {len(trace.step_seconds)} steps")  # fmt: skip

    tokens = len(prompts) * args.new_tokens
    tok_s = {name: tokens / statistics.median(runs) for name, runs in seconds.items()}
    report = {
        "machine": machine_info(),
        "command": vars(args) | {"out": str(args.out) if args.out else None},
        "model": "demo" if args.demo else args.model,
        "requests": len(waves),
        "streams": args.streams,
        "new_tokens": args.new_tokens,
        "draft": args.draft,
        "configs": {
            name: {
                "tok_s": round(tok_s[name], 2),
                "over_plain": round(tok_s[name] / tok_s["plain"], 3),
                "runs_s": [round(s, 3) for s in seconds[name]],
                "steps": steps[name],
                # generated tokens a decode step emitted per stream (the prefill's first aside)
                "tokens_per_step": round(
                    len(waves) * (args.new_tokens - 1) / max(1, steps[name] - len(waves)), 2
                ),
                "drafts_accepted": acceptance[name][0],
                "drafts_rejected": acceptance[name][1],
                "outputs_identical": identical[name],
            }
            for name in configs
        },
    }
    print(json.dumps(report["configs"], indent=1))
    if args.out:
        args.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
