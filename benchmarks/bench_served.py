"""Generated tokens per second through a real `loraserve serve`, as clients see them.

`bench_multi_lora.py` steps the engine on its own thread; this measures the whole server: its
engine thread beside the gRPC, start-up and helper threads. It starts `loraserve serve` on the
default benchmark model (hidden 1024, 8 layers, NF4, fp32 compute; written once like the other
benchmarks' models), `--max-batch-size 32`, then runs `--rounds` rounds of 32 concurrent unary
Generate calls (the benchmark's 64-128-token random prompts, 64 new tokens each, `ignore_eos`),
each round timed from the first call to the last reply. The first round is a warm-up and is
not counted; later rounds find the prompts in the prefix cache, so the figure is mostly decode.

    .venv/bin/python benchmarks/bench_served.py --out benchmarks/results/served.json
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

from bench_metrics_scrape import serving
from bench_multi_lora import DEFAULT, make_workload
from common import DEFAULT_CACHE_DIR, prepare_model
from loraserve_client import Client
from machine import machine_info

STARTUP_TIMEOUT_S = 300.0


def served_rates(model_dir: Path, rounds: int, log_path: Path) -> list[float]:
    """Generated tokens per second of each round after the first."""
    flags = [
        "--model", str(model_dir), "--max-batch-size", str(DEFAULT.num_requests),
        "--adapter-dir", tempfile.mkdtemp(prefix="bench-served-"),
    ]  # fmt: skip
    prompts = make_workload(DEFAULT, [""] * DEFAULT.num_requests).prompts
    with (
        serving(flags, log_path, STARTUP_TIMEOUT_S) as address,
        Client(address, timeout=600) as client,
        ThreadPoolExecutor(len(prompts)) as pool,
    ):

        def generate(prompt: tuple[int, ...]) -> int:
            options = {"max_new_tokens": DEFAULT.new_tokens, "ignore_eos": True}
            return len(client.generate(list(prompt), **options).token_ids)

        rates = []
        for _ in range(rounds):
            start = time.perf_counter()
            tokens = sum(pool.map(generate, prompts))
            rates.append(tokens / (time.perf_counter() - start))
    return rates[1:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="rounds, the first not counted")
    parser.add_argument("--out", type=Path, help="write the results as JSON to this file")
    args = parser.parse_args()
    if args.rounds < 2:
        parser.error("--rounds must be >= 2 (the first is a warm-up)")
    model_dir = prepare_model(DEFAULT.model, DEFAULT_CACHE_DIR)
    log_path = Path(tempfile.gettempdir()) / "bench_served.log"
    rates = served_rates(model_dir, args.rounds, log_path)
    median = statistics.median(rates)
    print(f"served tok/s per round {[round(r, 1) for r in rates]}, median {median:.1f}")
    if args.out is not None:
        result = {
            "served_tok_s": median,
            "rounds_tok_s": rates,
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": machine_info(),
            "command": shlex.join([sys.executable, *sys.argv]),
        }
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
