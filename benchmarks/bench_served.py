"""Generated tokens per second through a real `loraserve serve`, as clients see them.

`bench_multi_lora.py` steps the engine on its own thread; this measures the whole server: its
engine thread beside the gRPC, start-up and helper threads. It starts `loraserve serve` on the
default benchmark model (hidden 1024, 8 layers, NF4, fp32 compute; written once like the other
benchmarks' models), `--max-batch-size 32`, then runs `--rounds` rounds of 32 (`--concurrency`)
concurrent unary Generate calls (the benchmark's 64-128-token random prompts, 64 new tokens each,
`ignore_eos`), each round timed from the first call to the last reply. The first round is a
warm-up and is not counted; later rounds find the prompts in the prefix cache, so the figure is
mostly decode.
`--front` picks the API the calls take: gRPC through `loraserve_client` (the default), the
OpenAI-compatible HTTP API through the official `openai` package (`/v1/completions`, the prompt
as token ids), or both, the same server's rounds taking turns between them (which goes first
alternates), each front's rate its own. `--stream` makes every call a streaming one (gRPC's
GenerateStream, or server-sent events), each token read by the client as it comes.
With `--neighbour` a process that keeps one CPU busy (`yes > /dev/null`) runs beside the
server for the counted rounds; `--serve-args` adds flags to `loraserve serve` (for example
`--no-adaptive-threads`). At the end the server's `/metrics` give the thread count its next
decode step gets and the time its parallel ops waited for their threads, and, from before and
after the counted rounds, the engine's forwards in them (how many, how long each, and their
share of the rounds' wall time: the rest is the server's own work and waiting).

    .venv/bin/python benchmarks/bench_served.py --out benchmarks/results/served.json
    .venv/bin/python benchmarks/bench_served.py --neighbour --serve-args=--no-adaptive-threads
    .venv/bin/python benchmarks/bench_served.py --concurrency 8   # decode steps of 8 rows
    .venv/bin/python benchmarks/bench_served.py --front both --stream
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

from openai import OpenAI
from prometheus_client.parser import text_string_to_metric_families

from bench_metrics_scrape import free_ports, scrape, serving
from bench_multi_lora import DEFAULT, make_workload
from common import DEFAULT_CACHE_DIR, prepare_model
from loraserve_client import Client, Finished
from machine import machine_info

STARTUP_TIMEOUT_S = 300.0
NEIGHBOUR = "exec yes > /dev/null"
FRONTS = ("grpc", "openai")
SERVED_MODEL_NAME = "bench"  # the base model's name in OpenAI requests


@dataclass(frozen=True)
class Served:
    rates: dict[str, list[float]]  # front -> generated tokens a second of each counted round
    compute_threads: float | None  # loraserve_compute_threads at the end
    team_wait_seconds: float | None  # loraserve_compute_team_wait_seconds_total at the end
    forward: dict[str, Forwards]  # phase -> the engine's forwards during the counted rounds
    counted_seconds: float  # wall time of the counted rounds


@dataclass(frozen=True)
class Forwards:
    """The engine's model forwards of one phase (`loraserve_step_duration_seconds`)."""

    count: int
    seconds: float


def metric(text: str, name: str) -> float | None:
    """The value of the unlabelled sample `name` in Prometheus text, or None."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and not sample.labels:
                return float(sample.value)
    return None


def forwards(text: str) -> dict[str, Forwards]:
    """phase -> the forwards counted so far in Prometheus text."""
    count: dict[str, float] = {}
    seconds: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            phase = sample.labels.get("phase")
            if sample.name == "loraserve_step_duration_seconds_count":
                count[phase] = sample.value
            elif sample.name == "loraserve_step_duration_seconds_sum":
                seconds[phase] = sample.value
    return {phase: Forwards(int(count[phase]), seconds[phase]) for phase in count}


class Calls:
    """One greedy call of the benchmark's length through each front, returning how many tokens
    it generated: unary, or streamed and read token by token."""

    def __init__(self, grpc: Client, openai: OpenAI | None, stream: bool) -> None:
        self.grpc, self.openai, self.stream = grpc, openai, stream

    def call(self, front: str, prompt: tuple[int, ...]) -> int:
        return self._grpc(prompt) if front == "grpc" else self._openai(prompt)

    def _grpc(self, prompt: tuple[int, ...]) -> int:
        options = {"max_new_tokens": DEFAULT.new_tokens, "ignore_eos": True}
        if not self.stream:
            return len(self.grpc.generate(list(prompt), **options).token_ids)
        with self.grpc.generate_stream(list(prompt), **options) as events:
            finished = [e for e in events if isinstance(e, Finished)]
        return finished[0].completion_tokens

    def _openai(self, prompt: tuple[int, ...]) -> int:
        assert self.openai is not None
        fields = {"model": SERVED_MODEL_NAME, "prompt": list(prompt), "temperature": 0,
                  "max_tokens": DEFAULT.new_tokens, "extra_body": {"ignore_eos": True}}  # fmt: skip
        if not self.stream:
            reply = self.openai.completions.create(**fields)
            assert reply.usage is not None
            return reply.usage.completion_tokens
        chunks = self.openai.completions.create(
            **fields, stream=True, stream_options={"include_usage": True}
        )
        usage = [chunk.usage for chunk in chunks if chunk.usage is not None]
        return usage[0].completion_tokens


def served_rates(
    model_dir: Path,
    rounds: int,
    concurrency: int,
    log_path: Path,
    extra_flags: list[str],
    neighbour: bool,
    fronts: tuple[str, ...],
    stream: bool,
) -> Served:
    """`rounds` rounds of `concurrency` calls through each of `fronts` against a server started
    with `extra_flags` too, the counted ones beside the neighbour if `neighbour`; then the
    server's thread metrics and the engine's forwards during the counted rounds."""
    metrics_port, http_port = free_ports(2)
    flags = [
        "--model", str(model_dir), "--max-batch-size", str(DEFAULT.num_requests),
        "--adapter-dir", tempfile.mkdtemp(prefix="bench-served-"),
        "--metrics-port", str(metrics_port), "--served-model-name", SERVED_MODEL_NAME,
        *(["--http-port", str(http_port)] if "openai" in fronts else []), *extra_flags,
    ]  # fmt: skip
    prompts = make_workload(DEFAULT, [""] * DEFAULT.num_requests).prompts[:concurrency]
    busy = None
    metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
    openai = None
    if "openai" in fronts:
        openai = OpenAI(base_url=f"http://127.0.0.1:{http_port}/v1", api_key="unused",
                        timeout=600, max_retries=0)  # fmt: skip
    with (
        serving(flags, log_path, STARTUP_TIMEOUT_S) as address,
        Client(address, timeout=600) as client,
        ThreadPoolExecutor(len(prompts)) as pool,
    ):
        calls = Calls(client, openai, stream)
        rates: dict[str, list[float]] = {front: [] for front in fronts}
        counted_seconds = 0.0
        try:
            for round_ in range(rounds):
                if round_ == 1:  # after the warm-up
                    before = forwards(scrape(metrics_url)[1].decode())
                    if neighbour:
                        busy = subprocess.Popen(NEIGHBOUR, shell=True)
                for front in fronts if round_ % 2 == 0 else fronts[::-1]:
                    start = time.perf_counter()
                    tokens = sum(pool.map(lambda p, f=front: calls.call(f, p), prompts))
                    seconds = time.perf_counter() - start
                    rates[front].append(tokens / seconds)
                    counted_seconds += seconds if round_ else 0.0
        finally:
            if busy is not None:
                busy.kill()
                busy.wait()
            if openai is not None:
                openai.close()
        text = scrape(metrics_url)[1].decode()
    after = forwards(text)
    counted = {
        phase: Forwards(
            now.count - before.get(phase, Forwards(0, 0.0)).count,
            now.seconds - before.get(phase, Forwards(0, 0.0)).seconds,
        )
        for phase, now in after.items()
    }
    return Served(
        {front: r[1:] for front, r in rates.items()},
        metric(text, "loraserve_compute_threads"),
        metric(text, "loraserve_compute_team_wait_seconds_total"),
        counted,
        counted_seconds,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="rounds, the first not counted")
    parser.add_argument("--out", type=Path, help="write the results as JSON to this file")
    parser.add_argument(
        "--neighbour", action="store_true", help=f"run `{NEIGHBOUR}` beside the counted rounds"
    )
    parser.add_argument("--serve-args", default="", help="more flags for loraserve serve")
    parser.add_argument(
        "--concurrency", type=int, default=DEFAULT.num_requests,
        help=f"concurrent calls a round (1-{DEFAULT.num_requests})",
    )  # fmt: skip
    parser.add_argument(
        "--front", choices=(*FRONTS, "both"), default="grpc",
        help="the API the calls take: gRPC, the OpenAI HTTP API, or both taking turns",
    )  # fmt: skip
    parser.add_argument(
        "--stream", action="store_true", help="streaming calls, read token by token"
    )
    args = parser.parse_args()
    if args.rounds < 2:
        parser.error("--rounds must be >= 2 (the first is a warm-up)")
    if not 1 <= args.concurrency <= DEFAULT.num_requests:
        parser.error(f"--concurrency must be from 1 to {DEFAULT.num_requests}")
    fronts = FRONTS if args.front == "both" else (args.front,)
    model_dir = prepare_model(DEFAULT.model, DEFAULT_CACHE_DIR)
    log_path = Path(tempfile.gettempdir()) / "bench_served.log"
    served = served_rates(
        model_dir, args.rounds, args.concurrency, log_path, shlex.split(args.serve_args),
        args.neighbour, fronts, args.stream,
    )  # fmt: skip
    medians = {front: statistics.median(rates) for front, rates in served.rates.items()}
    forward_seconds = sum(f.seconds for f in served.forward.values())
    busy_share = forward_seconds / served.counted_seconds
    for front, rates in served.rates.items():
        print(f"{front}{' streamed' if args.stream else ''}: served tok/s per round "
              f"{[round(r, 1) for r in rates]}, median {medians[front]:.1f}")  # fmt: skip
    if len(medians) == 2:
        print(f"openai / grpc: {medians['openai'] / medians['grpc']:.3f}")
    print(f"compute threads at the end {served.compute_threads}, team waits "
          f"{served.team_wait_seconds} s")  # fmt: skip
    for phase, f in sorted(served.forward.items()):
        print(f"{phase}: {f.count} forwards, {1000 * f.seconds / max(f.count, 1):.1f} ms each")
    print(f"the engine's forwards took {busy_share:.3f} of the counted rounds' wall time")
    if args.out is not None:
        result = {
            "served_tok_s": medians[fronts[0]],
            "rounds_tok_s": served.rates[fronts[0]],
            "by_front": {
                front: {"served_tok_s": medians[front], "rounds_tok_s": rates}
                for front, rates in served.rates.items()
            },
            "stream": args.stream,
            "concurrency": args.concurrency,
            "neighbour": NEIGHBOUR if args.neighbour else None,
            "serve_args": args.serve_args,
            "compute_threads_at_end": served.compute_threads,
            "team_wait_seconds_at_end": served.team_wait_seconds,
            "forwards": {phase: asdict(f) for phase, f in served.forward.items()},
            "forward_share_of_wall": busy_share,
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": machine_info(),
            "command": shlex.join([sys.executable, *sys.argv]),
        }
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
