"""Memory under a long, varied load: the engine's resident set while it serves random batches.

Builds the default benchmark's engine (its model and 32 rank-16 adapters, each in a device slot,
the prefix cache on as the server runs it) and, for `--seconds`, runs rounds of 1 to 48 requests:
random prompt lengths up to the benchmark's longest, some rounds sharing a few prefixes (the
prefix cache keeps, reuses and evicts their blocks), random output lengths, each request on a
random adapter or on the base, half of a round submitted at once and the rest a few steps
later. After every round it records the process's resident set (RSS). A server whose memory
grows with its traffic (a leak, or the allocator fragmenting) shows it as a climb after the
first rounds have reached every batch shape's high-water mark. The summary also says how its
decode steps ran (`decode_steps`: replayed from a record of the forward, recorded, eager), which
batches of every size put to the test.

With `--churn` the engine is the benchmark's Zipf one instead: 1,000 registered adapters (the
32 files under 1,000 names), 32 device slots and a host tier that holds a quarter of them, and
each request names one of the 1,000 at random, so adapters keep moving from disk to the host
tier to a slot and out again; the host tier's budget then bounds what the process may grow by.

    .venv/bin/python benchmarks/bench_soak.py --seconds 600 [--churn] \
        --out benchmarks/results/soak.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import time
from dataclasses import asdict
from pathlib import Path

import loraserve.model.bitsandbytes_offline  # noqa: F401  (before peft, which imports it)

import transformers

from adapter_cache import ZIPF_ADAPTERS, build_zipf_engine
from bench_multi_lora import DEFAULT, TARGETS, base_engine_config, make_workload
from common import DEFAULT_CACHE_DIR, Workload, prepare_lora_adapters, prepare_model
from engine_runs import Trace, build_engine, engine_config, step_until_idle, submit
from loraserve.engine.core import EngineCore
from loraserve.model.host_memory import one_arena
from machine import machine_info

MOST_REQUESTS = 48  # a round's requests at most
SHARED_PREFIXES = 4  # prompts of a sharing round start with one of this many
FIRST_ID = 3  # token ids from here on are ordinary tokens in the benchmark's vocabulary


def rss_mib() -> float:
    """This process's resident set, MiB."""
    resident_pages = int(Path("/proc/self/statm").read_text().split()[1])
    return resident_pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def random_round(rng: random.Random, adapters: list[str], prefixes: list[tuple[int, ...]],
                 longest: int, most_new: int) -> Workload:  # fmt: skip
    """One round's requests; a third of rounds start each prompt with a shared prefix."""
    count = rng.randint(1, MOST_REQUESTS)
    sharing = rng.random() < 1 / 3
    prompts = []
    for _ in range(count):
        head = rng.choice(prefixes) if sharing else ()
        tail = rng.randint(1, longest - len(head))
        prompts.append(head + tuple(rng.randrange(FIRST_ID, 500) for _ in range(tail)))
    names = tuple(rng.choice(adapters) for _ in range(count))
    return Workload(tuple(prompts), names, rng.randint(1, most_new))


def soak(core: EngineCore, adapters: list[str], seconds: float, seed: int) -> list[dict]:
    """Rounds until `seconds` have passed; each round's end: elapsed s, round, RSS MiB."""
    rng = random.Random(seed)
    longest, most_new = DEFAULT.prompt_tokens[1], DEFAULT.new_tokens
    prefixes = [
        tuple(rng.randrange(FIRST_ID, 500) for _ in range(longest // 2))
        for _ in range(SHARED_PREFIXES)
    ]
    timeline, start = [], time.monotonic()
    while time.monotonic() - start < seconds:
        w = random_round(rng, adapters, prefixes, longest, most_new)
        half = len(w.prompts) // 2
        first = Workload(w.prompts[:half], w.adapters[:half], w.new_tokens)
        later = Workload(w.prompts[half:], w.adapters[half:], w.new_tokens)
        with_adapters = rng.random() < 0.7
        trace = Trace()
        submit(core, trace, first, with_adapters)
        step_until_idle(core, trace, {rng.randint(0, 5): later}, with_adapters)
        timeline.append({"seconds": round(time.monotonic() - start, 1),
                         "round": len(timeline) + 1, "rss_mib": round(rss_mib(), 1)})  # fmt: skip
    return timeline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=600)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--churn", action="store_true", help="1,000 adapters through 32 slots")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    one_arena()  # first, as `loraserve serve` does (model/host_memory)
    logging.basicConfig(level=logging.WARNING)
    transformers.logging.disable_progress_bar()
    config = DEFAULT
    model_dir = prepare_model(config.model, args.cache_dir)
    adapter_dirs = prepare_lora_adapters(
        model_dir, config.num_requests, config.rank, config.alpha, TARGETS, config.seed
    )
    sized = engine_config(
        base_engine_config(config, model_dir), make_workload(config, list(adapter_dirs)),
        config.prompt_tokens[1], MOST_REQUESTS,
    )  # fmt: skip
    settings = sized.model_copy(update={"prefix_caching": True})
    if args.churn:
        core = build_zipf_engine(settings, list(adapter_dirs.values()))
        names = [f"zipf-{i}" for i in range(ZIPF_ADAPTERS)]
    else:
        core = build_engine(settings, adapter_dirs)
        names = sorted(adapter_dirs)
    built = rss_mib()
    timeline = soak(core, names, args.seconds, args.seed)
    third = timeline[len(timeline) // 3]
    summary = {
        "rss_mib_built": round(built, 1),
        "rss_mib_after_a_third": third["rss_mib"],
        "rss_mib_end": timeline[-1]["rss_mib"],
        "rss_mib_max": max(point["rss_mib"] for point in timeline),
        "growth_mib_after_a_third": round(timeline[-1]["rss_mib"] - third["rss_mib"], 1),
        "rounds": len(timeline),
    }
    records = core.runner.record_stats()  # how its decode steps ran: varied batches' sizes
    if records is not None:
        summary["decode_steps"] = asdict(records)
    print(json.dumps(summary, indent=2))
    if args.out:
        record = {"machine": machine_info(), "seconds": args.seconds, "seed": args.seed,
                  "churn": args.churn, "summary": summary, "timeline": timeline}  # fmt: skip
        args.out.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
