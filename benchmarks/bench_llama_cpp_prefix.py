"""Prompt prefixes reused across requests, by llama.cpp's `llama-server` and by the engine:
how much time reuse saves, and whether a prefix computed under one adapter is reused for
another (whose keys and values differ: its output would then be the wrong adapter's).

The benchmark's default base (stored as `--checkpoint-dtype`) and two of its LoRA adapters (A,
B), llama.cpp's Q4_0 file and GGUF adapters as `bench_llama_cpp.py` writes them, a prompt P of
`--prompt-tokens` random tokens (a new one each round, so that nothing of an earlier round is
found), greedy, `--new-tokens` each:

  cold_a, cold_b     P on A, on B, nothing reusable (llama-server: `cache_prompt` false; the
                     engine: one without prefix caching)
  warm_a             P on A right after P on A: the legitimate reuse
  b_after_a          P on B right after P on A: reuse here is the wrong adapter's
  next_turn_a        a conversation's next turn on A, right after warm_a: P, warm_a's answer
                     and `--follow-up-tokens` more (cold_next_a: the same prompt, nothing
                     reusable)

llama-server runs with one slot (`-np 1`), so each request finds the previous one's prompt in
it. For each case: the prompt tokens evaluated (llama-server's `timings.prompt_n`; the engine's
prompt tokens minus those its prefix cache gave), the time to the first token (llama-server's
`prompt_ms`; the engine's from submission) and whether the output equals the cold run's on the
same adapter (`same_as_cold`). Medians of `--repeats` rounds.

    .venv/bin/python benchmarks/bench_llama_cpp_prefix.py \\
        --out benchmarks/results/llama_cpp_prefix.json
    .venv/bin/python benchmarks/bench_llama_cpp_prefix.py --compute-dtype fp32

The engine shares the full blocks of a prompt and, since 2026-12-05, those its answer fills
(not with `batch_invariant`, whose decode rows' KV has other bits than a prompt's), and copies
the prompt tokens after them that a cached block holds (a prompt sent again computes only its
last token).

In bf16 the engine's `warm_a` is the same only with `--batch-invariant`: a prompt whose prefix
comes from the cache sums its last block's attention apart from the whole prompt's.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import urllib.request
from dataclasses import replace
from pathlib import Path

import loraserve.model.bitsandbytes_offline  # noqa: F401  (before peft, which imports it)

import torch
import transformers

from bench_llama_cpp import LLAMA_CPP_DIR, convert_adapters, llama_server, prepare_gguf
from bench_multi_lora import DEFAULT, TARGETS, base_engine_config
from common import DEFAULT_CACHE_DIR, Workload, prepare_lora_adapters, prepare_model
from engine_runs import Trace, build_engine, engine_config, step_until_idle, submit, ttft_ms
from loraserve.engine.core import EngineCore
from machine import machine_info

CASES = ("cold_a", "cold_b", "warm_a", "b_after_a", "cold_next_a", "next_turn_a")
COLD = {"cold_a": "cold_a", "warm_a": "cold_a", "cold_b": "cold_b", "b_after_a": "cold_b",
        "cold_next_a": "cold_next_a", "next_turn_a": "cold_next_a"}  # fmt: skip


def llama_complete(url: str, prompt: list[int], lora: int, new_tokens: int, cache: bool) -> dict:
    """One greedy /completion on LoRA `lora` of the two loaded: its tokens and timings."""
    body = {
        "prompt": prompt, "n_predict": new_tokens, "ignore_eos": True, "temperature": 0.0,
        "cache_prompt": cache, "lora": [{"id": i, "scale": float(i == lora)} for i in (0, 1)],
        "return_tokens": True,
    }  # fmt: skip
    sent = urllib.request.Request(
        f"{url}/completion", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(sent, timeout=600) as response:
        reply = json.load(response)
    timings = reply["timings"]
    return {"output": reply["tokens"], "evaluated": timings["prompt_n"],
            "ttft_ms": timings["prompt_ms"]}  # fmt: skip


def llama_round(url: str, prompt: list[int], new_tokens: int, follow_up: list[int]
                ) -> dict[str, dict]:  # fmt: skip
    """Every case once, in an order that leaves each case's predecessor in the one slot."""
    cold_a = llama_complete(url, prompt, 0, new_tokens, cache=False)
    cold_b = llama_complete(url, prompt, 1, new_tokens, cache=False)
    llama_complete(url, prompt, 0, new_tokens, cache=True)  # P on A in the slot
    b_after_a = llama_complete(url, prompt, 1, new_tokens, cache=True)
    llama_complete(url, prompt, 0, new_tokens, cache=True)  # P on A in the slot again
    warm_a = llama_complete(url, prompt, 0, new_tokens, cache=True)
    turn = prompt + warm_a["output"] + follow_up
    next_turn_a = llama_complete(url, turn, 0, new_tokens, cache=True)
    cold_next_a = llama_complete(url, turn, 0, new_tokens, cache=False)
    return {"cold_a": cold_a, "cold_b": cold_b, "warm_a": warm_a, "b_after_a": b_after_a,
            "cold_next_a": cold_next_a, "next_turn_a": next_turn_a}  # fmt: skip


def engine_complete(core: EngineCore, prompt: tuple[int, ...], adapter: str,
                    new_tokens: int) -> dict:  # fmt: skip
    """One request on `adapter`: its tokens, the prompt tokens it evaluated and its TTFT."""
    counters = core.allocator.counters
    hits, copied = counters.hit_blocks, counters.copied_tokens
    trace = Trace()
    submit(core, trace, Workload((prompt,), (adapter,), new_tokens), with_adapters=True)
    step_until_idle(core, trace)
    reused = (counters.hit_blocks - hits) * core.config.kv_block_size
    reused += counters.copied_tokens - copied
    return {"output": trace.token_ids[0], "evaluated": len(prompt) - reused,
            "ttft_ms": ttft_ms(trace)[0]}  # fmt: skip


def engine_round(cores: dict[bool, EngineCore], prompt: tuple[int, ...], names: list[str],
                 new_tokens: int, follow_up: tuple[int, ...]) -> dict[str, dict]:  # fmt: skip
    """Every case once: the cold ones on an engine without prefix caching, the rest on one
    with it, P on A run first."""
    a, b = names
    cold_a = engine_complete(cores[False], prompt, a, new_tokens)
    cold_b = engine_complete(cores[False], prompt, b, new_tokens)
    engine_complete(cores[True], prompt, a, new_tokens)
    b_after_a = engine_complete(cores[True], prompt, b, new_tokens)
    warm_a = engine_complete(cores[True], prompt, a, new_tokens)
    turn = prompt + tuple(warm_a["output"]) + follow_up
    next_turn_a = engine_complete(cores[True], turn, a, new_tokens)
    cold_next_a = engine_complete(cores[False], turn, a, new_tokens)
    return {"cold_a": cold_a, "cold_b": cold_b, "warm_a": warm_a, "b_after_a": b_after_a,
            "cold_next_a": cold_next_a, "next_turn_a": next_turn_a}  # fmt: skip


def summary(rounds: list[dict[str, dict]]) -> dict[str, dict]:
    """Per case: the median TTFT and evaluated prompt tokens, and whether every round's output
    equalled that round's cold output on the same adapter."""
    return {
        case: {
            "ttft_ms": round(statistics.median(r[case]["ttft_ms"] for r in rounds), 2),
            "evaluated": statistics.median(r[case]["evaluated"] for r in rounds),
            "same_as_cold": all(r[case]["output"] == r[COLD[case]]["output"] for r in rounds),
        }
        for case in CASES
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--follow-up-tokens", type=int, default=32)
    parser.add_argument("--checkpoint-dtype", choices=("fp32", "bf16"), default="bf16")
    parser.add_argument("--compute-dtype", choices=("fp32", "bf16"), default="bf16")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--batch-invariant", action="store_true", help="the engines' setting")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--llama-cpp", type=Path, default=LLAMA_CPP_DIR)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()

    spec = replace(DEFAULT.model, weights_dtype=args.checkpoint_dtype)
    bench = replace(DEFAULT, model=spec, compute_dtype=args.compute_dtype)
    model_dir = prepare_model(spec, DEFAULT_CACHE_DIR)
    bin_dir = args.llama_cpp / "bin"
    files = prepare_gguf(model_dir, bin_dir)
    adapters = prepare_lora_adapters(model_dir, DEFAULT.num_requests, DEFAULT.rank, DEFAULT.alpha,
                                     TARGETS)  # fmt: skip
    pair = dict(list(adapters.items())[:2])
    lora_files = convert_adapters(pair, model_dir, args.llama_cpp / "convert" /
                                  "convert_lora_to_gguf.py")  # fmt: skip
    generator = torch.Generator().manual_seed(3)

    def random_tokens(count: int) -> tuple[int, ...]:
        return tuple(torch.randint(3, spec.vocab_size, (count,), generator=generator).tolist())

    longest = args.prompt_tokens + args.new_tokens + args.follow_up_tokens  # the next turn's
    workload = Workload((random_tokens(args.prompt_tokens),), (next(iter(pair)),), args.new_tokens)
    # room for three requests' blocks: P on A stays cached while P on B runs
    settings = engine_config(base_engine_config(bench, model_dir), workload, longest, 3)
    cores = {
        caching: build_engine(
            settings.model_copy(
                update={"prefix_caching": caching, "batch_invariant": args.batch_invariant}
            ),
            pair,
        )
        for caching in (False, True)
    }
    engine_rounds, llama_rounds = [], []
    context = longest + args.new_tokens
    with llama_server(bin_dir, files["Q4_0"], lora_files, 1, context, args.threads) as url:
        for round_ in range(args.repeats + 1):  # round 0 warms both up
            prompt, follow_up = (
                random_tokens(args.prompt_tokens),
                random_tokens(args.follow_up_tokens),
            )
            llama = llama_round(url, list(prompt), args.new_tokens, list(follow_up))
            engine = engine_round(cores, prompt, list(pair), args.new_tokens, follow_up)
            if round_:
                llama_rounds.append(llama)
                engine_rounds.append(engine)
            print(f"round {round_} of {args.repeats} done (0: warm-up)", flush=True)
    results = {"llama.cpp Q4_0": summary(llama_rounds), "loraserve": summary(engine_rounds)}
    print(json.dumps(results, indent=2))
    if args.out:
        report = {"machine": machine_info(), "command": {k: str(v) for k, v in vars(args).items()},
                  "results": results}  # fmt: skip
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
