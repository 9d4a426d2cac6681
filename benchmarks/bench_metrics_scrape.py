"""How long a Prometheus scrape of loraserve's /metrics takes, with the server idle and under load.

Inference gateways scrape every replica every 50 ms to route requests, so a scrape must stay
cheap while the engine is busy. This starts a real `loraserve serve` (the built-in tiny model,
`--device cpu` by default, free loopback ports, `--max-batch-size 32`), then:

  idle   scrapes /metrics every `--interval` seconds for `--idle-duration` seconds, no traffic
  load   keeps `--concurrency` streaming generations (GenerateStream, `--max-new-tokens` each,
         one after another per thread) in flight, waits until every stream has its first
         token, and scrapes every `--interval` seconds for `--duration` seconds

Each scrape is one HTTP GET with urllib on a new connection, timed from the request to the last
byte of the body. Reported per phase: p50, p99 and max in milliseconds, the exposition size in
bytes, and for the load phase the generated tokens per second and the mean of the
`loraserve_requests_running` gauge seen by the scrapes (to show the load was real). Scrapes
that fail are counted, not timed. The client threads and the scraper share this process;
streaming clients spend their time in gRPC's C core, so they barely touch the timings.

Run (from the repository root):

    .venv/bin/python benchmarks/bench_metrics_scrape.py
    .venv/bin/python benchmarks/bench_metrics_scrape.py --duration 60 --out scrape.json

`--out` writes the figures, the individual scrape times, the configuration, the date, the
machine and the command line as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from loraserve_client.v1 import generation_pb2, generation_pb2_grpc

PROMPT = "Write a short story about a lighthouse keeper who counts the ships at night."
RUNNING = re.compile(rb"^loraserve_requests_running (\S+)$", re.MULTILINE)


@dataclass(frozen=True)
class BenchConfig:
    duration: float = 20.0  # seconds of scraping under load
    idle_duration: float = 5.0  # seconds of scraping with no traffic
    interval: float = 0.05  # seconds between scrape starts, as a gateway does
    concurrency: int = 16  # streaming generations kept in flight
    max_new_tokens: int = 64
    max_batch_size: int = 32
    device: str = "cpu"
    startup_timeout: float = 180.0


@dataclass
class Phase:
    """The scrapes of one phase: wall times (ms), body sizes (bytes), running-gauge readings."""

    ms: list[float] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)
    running: list[float] = field(default_factory=list)
    errors: int = 0


# ---- the server ----------------------------------------------------------------------------


def free_ports(n: int) -> list[int]:
    """n distinct free loopback ports (all bound at once, so none repeats)."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def is_serving(address: str) -> bool:
    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=2
            )
        except grpc.RpcError:
            return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


@contextmanager
def serving(flags: list[str], log_path: Path, startup_timeout: float) -> Iterator[str]:
    """Yield the gRPC address of a SERVING `loraserve serve <flags>` on a free loopback port
    (its output in `log_path`); stop it on exit."""
    (port,) = free_ports(1)
    command = [sys.executable, "-m", "loraserve.cli", "serve", "--port", str(port), *flags]
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    address = f"127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + startup_timeout
        while not is_serving(address):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"server not SERVING; its log:\n{log_path.read_text()}")
            time.sleep(0.2)
        yield address
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextmanager
def running_server(config: BenchConfig, log_path: Path) -> Iterator[tuple[str, str]]:
    """Yield (gRPC address, metrics URL) of a SERVING `loraserve serve`; stop it on exit."""
    (metrics_port,) = free_ports(1)
    flags = [
        "--device", config.device, "--metrics-port", str(metrics_port),
        "--max-batch-size", str(config.max_batch_size),
    ]  # fmt: skip
    with serving(flags, log_path, config.startup_timeout) as address:
        yield address, f"http://127.0.0.1:{metrics_port}/metrics"


# ---- load and scrapes ----------------------------------------------------------------------


class LoadDriver:
    """`concurrency` threads, each running streaming generations back to back until stopped."""

    def __init__(self, address: str, config: BenchConfig) -> None:
        self.config = config
        self.channel = grpc.insecure_channel(address)
        self.stub = generation_pb2_grpc.GenerationServiceStub(self.channel)
        self.stop = threading.Event()
        self.all_streaming = threading.Event()
        self.lock = threading.Lock()
        self.tokens = 0
        self.streams = 0
        self.failures = 0
        self._first_tokens = 0
        self.threads = [
            threading.Thread(target=self._run, daemon=True) for _ in range(config.concurrency)
        ]

    def __enter__(self) -> LoadDriver:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join()
        self.channel.close()

    def _run(self) -> None:
        request = generation_pb2.GenerateStreamRequest(
            input=generation_pb2.GenerationInput(
                text=PROMPT, max_new_tokens=self.config.max_new_tokens
            )
        )
        first = True
        while not self.stop.is_set():
            try:
                for event in self.stub.GenerateStream(request, timeout=300):
                    if event.HasField("token"):
                        self._count_token(first)
                        first = False
            except grpc.RpcError:
                with self.lock:
                    self.failures += 1
            with self.lock:
                self.streams += 1

    def _count_token(self, first: bool) -> None:
        with self.lock:
            self.tokens += 1
            self._first_tokens += first
            if first and self._first_tokens == self.config.concurrency:
                self.all_streaming.set()

    def generated_tokens(self) -> int:
        with self.lock:
            return self.tokens


def scrape(url: str) -> tuple[float, bytes]:
    """(wall milliseconds, body) of one GET."""
    started = time.perf_counter()
    with urllib.request.urlopen(url, timeout=10) as reply:
        body = reply.read()
    return (time.perf_counter() - started) * 1000, body


def scrape_for(url: str, seconds: float, interval: float) -> Phase:
    """Scrape every `interval` seconds for `seconds`; a late scrape shifts the schedule."""
    phase = Phase()
    end = time.monotonic() + seconds
    next_at = time.monotonic()
    while next_at < end:
        time.sleep(max(0.0, next_at - time.monotonic()))
        try:
            ms, body = scrape(url)
        except OSError:
            phase.errors += 1
        else:
            phase.ms.append(ms)
            phase.sizes.append(len(body))
            match = RUNNING.search(body)
            if match:
                phase.running.append(float(match.group(1)))
        next_at = max(next_at + interval, time.monotonic())
    return phase


# ---- reporting -----------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks, as numpy's default; q in [0, 100]."""
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def phase_figures(phase: Phase) -> dict[str, float]:
    if not phase.ms:
        raise RuntimeError(f"no scrape succeeded ({phase.errors} failed)")
    return {
        "p50": percentile(phase.ms, 50),
        "p99": percentile(phase.ms, 99),
        "max": max(phase.ms),
        "bytes": max(phase.sizes),
    }


def machine_info() -> dict[str, object]:
    return {
        "platform": platform.platform(),
        "processor": platform.processor(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
    }


def report(
    config: BenchConfig,
    idle: Phase,
    load: Phase,
    load_tok_s: float,
    driver: LoadDriver,
) -> dict[str, object]:
    i, b = phase_figures(idle), phase_figures(load)
    running = sum(load.running) / len(load.running) if load.running else 0.0
    return {
        "scrape_ms_p50_idle": i["p50"],
        "scrape_ms_p99_idle": i["p99"],
        "scrape_ms_max_idle": i["max"],
        "scrape_ms_p50_load": b["p50"],
        "scrape_ms_p99_load": b["p99"],
        "scrape_ms_max_load": b["max"],
        "exposition_bytes": int(b["bytes"]),
        "exposition_bytes_idle": int(i["bytes"]),
        "scrapes": len(idle.ms) + len(load.ms),
        "scrapes_idle": len(idle.ms),
        "scrapes_load": len(load.ms),
        "scrape_errors": idle.errors + load.errors,
        "load_generated_tok_s": load_tok_s,
        "load_mean_running_requests": running,
        "load_streams_finished": driver.streams,
        "load_stream_failures": driver.failures,
        "scrape_ms_idle": idle.ms,
        "scrape_ms_load": load.ms,
        "config": asdict(config),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "command": shlex.join([sys.executable, *sys.argv]),
    }


def print_summary(summary: dict) -> None:
    print()
    print(f"{'phase':<6} {'scrapes':>7} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} {'bytes':>8}")
    for phase in ("idle", "load"):
        size = summary["exposition_bytes" + ("_idle" if phase == "idle" else "")]
        print(
            f"{phase:<6} {summary[f'scrapes_{phase}']:>7} "
            f"{summary[f'scrape_ms_p50_{phase}']:>8.2f} {summary[f'scrape_ms_p99_{phase}']:>8.2f} "
            f"{summary[f'scrape_ms_max_{phase}']:>8.2f} {size:>8}"
        )
    print(
        f"\nunder load: {summary['load_generated_tok_s']:.0f} generated tok/s, "
        f"{summary['load_mean_running_requests']:.1f} running requests on average, "
        f"{summary['scrape_errors']} failed scrapes, {summary['load_stream_failures']} failed "
        "streams"
    )


# ---- main ----------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> tuple[BenchConfig, Path | None]:
    default = BenchConfig()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--duration", type=float, default=default.duration, help="seconds of scraping under load"
    )
    parser.add_argument(
        "--idle-duration",
        type=float,
        default=default.idle_duration,
        help="seconds of scraping with no traffic",
    )
    parser.add_argument(
        "--interval", type=float, default=default.interval, help="seconds between scrapes"
    )
    parser.add_argument(
        "--concurrency", type=int, default=default.concurrency, help="streams kept in flight"
    )
    parser.add_argument("--max-new-tokens", type=int, default=default.max_new_tokens)
    parser.add_argument("--max-batch-size", type=int, default=default.max_batch_size)
    parser.add_argument("--device", default=default.device, help="cpu (default), cuda, cuda:N")
    parser.add_argument("--out", type=Path, help="write the results as JSON to this file")
    args = parser.parse_args(argv)
    for name in ("duration", "idle_duration", "interval"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be > 0")
    if args.concurrency < 1 or args.max_new_tokens < 1:
        parser.error("--concurrency and --max-new-tokens must be >= 1")
    config = BenchConfig(
        duration=args.duration,
        idle_duration=args.idle_duration,
        interval=args.interval,
        concurrency=args.concurrency,
        max_new_tokens=args.max_new_tokens,
        max_batch_size=args.max_batch_size,
        device=args.device,
    )
    return config, args.out


def main(argv: list[str] | None = None) -> None:
    config, out = parse_args(argv)
    with (
        tempfile.TemporaryDirectory(prefix="bench-scrape-") as tmp,
        running_server(config, Path(tmp) / "server.log") as (address, url),
    ):
        print(f"server SERVING at {address}; scraping {url}", flush=True)
        idle = scrape_for(url, config.idle_duration, config.interval)
        print(f"idle: {len(idle.ms)} scrapes", flush=True)
        with LoadDriver(address, config) as driver:
            if not driver.all_streaming.wait(config.startup_timeout):
                raise RuntimeError("the load never had every stream generating")
            tokens_before, started = driver.generated_tokens(), time.monotonic()
            load = scrape_for(url, config.duration, config.interval)
            load_seconds = time.monotonic() - started
            load_tok_s = (driver.generated_tokens() - tokens_before) / load_seconds
        print(f"load: {len(load.ms)} scrapes", flush=True)
    summary = report(config, idle, load, load_tok_s, driver)
    print_summary(summary)
    if out is not None:
        out.write_text(json.dumps(summary, indent=2) + "\n")
        print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
