"""Every metric loraserve exports, defined once, on one registry per server.

Names follow the Prometheus conventions: one `loraserve_` prefix, base units in the name,
counters ending in `_total`. Labels are bounded: finish reason, status code, reason, tier and
tenant (tenants are configured and few); never adapter or request ids. The one exception is the
gateway-compatibility family below, whose contract requires adapter names.

`names` decides whether tenant and adapter names appear at all: without it the tenant label is
empty (Prometheus reads an empty label as no label, so per-tenant series fold into one) and the
gateway gauge names no adapter, so whoever can scrape learns nothing about any tenant.

Gauges that mirror live state (running, waiting, KV usage, resident bytes, slots) are read at
scrape time from a `LiveState` callback, so a scrape costs a few attribute reads however often
it comes. The gateway family (`vllm:*`, on by default) is what the Kubernetes Gateway API
Inference Extension and llm-d read to route a request to the replica holding its adapter.

Knows nothing about the engine's internals: the engine pushes events, and `LiveState` answers.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from prometheus_client import (
    CollectorRegistry,
    Counter,
    GCCollector,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

# Buckets for LLM serving: sub-10 ms decode steps up to minute-long generations.
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 10, 20, 40, 80)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1, 2.5)
E2E_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320)
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
LOAD_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
COUNT_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
TIERS = ("host", "device")


@dataclass(frozen=True)
class TierStats:
    """One adapter cache tier: lookups found and missing, evictions, bytes held."""

    hits: int
    misses: int
    evictions: int
    resident_bytes: int  # host: weights; device: the buffers of occupied slots


@dataclass(frozen=True)
class AdapterStats:
    """The adapter manager's snapshot (`AdapterManager.stats`)."""

    slots_used: int
    slots_total: int
    references: int  # slot references held by queued and running requests
    host_entries: int
    load_failures: int
    host: TierStats
    device: TierStats

    @property
    def tiers(self) -> dict[str, TierStats]:
        return {"host": self.host, "device": self.device}


@dataclass(frozen=True)
class PrefixCacheStats:
    """The KV prefix cache's snapshot: blocks published, and what admissions found in it."""

    cached_blocks: int = 0
    queried_blocks: int = 0
    hit_blocks: int = 0
    copied_tokens: int = 0


@dataclass(frozen=True)
class DecodeRecordStats:
    """CPU decode steps and the records of the forward they replay (`traced_decode_records`):
    records held, and steps of decode rows by how each ran."""

    records: int
    replayed: int
    recorded: int
    eager: int


@dataclass(frozen=True)
class LiveState:
    """What the scrape-time gauges read; each field a cheap snapshot."""

    running: int
    waiting: int
    kv_usage_ratio: float
    adapters: AdapterStats
    # Adapter names of running and waiting requests, for the gateway gauge only: each comes
    # from a resolved adapter key (`AdapterKey.name`), so they are bounded by the adapters
    # registered or stored, never free text from a request.
    running_adapters: tuple[str, ...]
    waiting_adapters: tuple[str, ...]
    prefix_cache: PrefixCacheStats = PrefixCacheStats()
    compute_threads: int = 1  # what the next decode step runs on
    team_wait_seconds: float | None = None  # None: no compiled kernels to count it
    decode_records: DecodeRecordStats | None = None  # None: decode steps are not recorded
    updated_at: float = field(default_factory=time.time)


class _LiveCollector(Collector):
    def __init__(self, live: Callable[[], LiveState], gateway: bool, names: bool) -> None:
        self.live = live
        self.gateway = gateway
        self.names = names

    def collect(self) -> Iterator[Metric]:
        state = self.live()
        yield GaugeMetricFamily(
            "loraserve_requests_running", "Requests in the running batch.", value=state.running
        )
        yield GaugeMetricFamily(
            "loraserve_requests_waiting", "Requests queued for admission.", value=state.waiting
        )
        yield GaugeMetricFamily(
            "loraserve_kv_cache_usage_ratio",
            "Fraction of the KV cache budget reserved by running requests.",
            value=state.kv_usage_ratio,
        )
        yield GaugeMetricFamily(
            "loraserve_adapter_slots_used",
            "Device slots holding an adapter.",
            value=state.adapters.slots_used,
        )
        yield GaugeMetricFamily(
            "loraserve_adapter_slots",
            "Device slots for adapters.",
            value=state.adapters.slots_total,
        )
        resident = GaugeMetricFamily(
            "loraserve_adapter_resident_bytes",
            "Memory holding adapters, per tier (host: weights; device: slot buffers in use).",
            labels=["tier"],
        )
        tiers = state.adapters.tiers
        for tier, stats in tiers.items():
            resident.add_metric([tier], stats.resident_bytes)
        yield resident
        for name, text, count in (
            ("loraserve_adapter_cache_hits", "Adapter lookups found in a tier.", "hits"),
            ("loraserve_adapter_cache_misses", "Adapter lookups missing a tier.", "misses"),
            ("loraserve_adapter_evictions", "Adapters evicted from a tier.", "evictions"),
        ):
            family = CounterMetricFamily(name, text, labels=["tier"])
            for tier, stats in tiers.items():
                family.add_metric([tier], getattr(stats, count))
            yield family
        prefix = state.prefix_cache
        yield GaugeMetricFamily(
            "loraserve_prefix_cache_blocks",
            "KV blocks published in the prefix cache (in use or evictable).",
            value=prefix.cached_blocks,
        )
        yield CounterMetricFamily(
            "loraserve_prefix_cache_queried_blocks",
            "Full prompt KV blocks looked up in the prefix cache at admission.",
            value=prefix.queried_blocks,
        )
        yield CounterMetricFamily(
            "loraserve_prefix_cache_hit_blocks",
            "Prompt KV blocks found in the prefix cache (not recomputed).",
            value=prefix.hit_blocks,
        )
        yield CounterMetricFamily(
            "loraserve_prefix_cache_copied_tokens",
            "Prompt tokens past the blocks found whose KV was copied from a cached block.",
            value=prefix.copied_tokens,
        )
        yield GaugeMetricFamily(
            "loraserve_compute_threads",
            "Threads the next decode step computes on (fewer while other processes hold the CPUs).",
            value=state.compute_threads,
        )
        if state.team_wait_seconds is not None:
            yield CounterMetricFamily(
                "loraserve_compute_team_wait_seconds",
                "Time parallel ops' calling threads waited at the ops' ends for the rest of "
                "their compute threads (rises while other processes hold the CPUs).",
                value=state.team_wait_seconds,
            )
        records = state.decode_records
        if records is not None:
            yield GaugeMetricFamily(
                "loraserve_decode_records",
                "Records of the model's decode forward held (at most traced_decode_records).",
                value=records.records,
            )
            steps = CounterMetricFamily(
                "loraserve_decode_steps",
                "CPU steps of decode rows, by how they ran: replayed from a record of the "
                "forward, recorded (making one), or eager (no record serves the step: its row "
                "count past traced_decode_records' cap, its recording dropped, or an adapter "
                "with an embedding delta).",
                labels=["path"],
            )
            for path in ("replayed", "recorded", "eager"):
                steps.add_metric([path], getattr(records, path))
            yield steps
        if not self.gateway:
            return
        yield GaugeMetricFamily(
            "vllm:num_requests_running", "Requests running (gateway compatibility).",
            value=state.running,
        )  # fmt: skip
        yield GaugeMetricFamily(
            "vllm:num_requests_waiting", "Requests waiting (gateway compatibility).",
            value=state.waiting,
        )  # fmt: skip
        yield GaugeMetricFamily(
            "vllm:kv_cache_usage_perc", "KV cache usage, 0-1 (gateway compatibility).",
            value=state.kv_usage_ratio,
        )  # fmt: skip
        lora = GaugeMetricFamily(
            "vllm:lora_requests_info",
            "Adapters of running and waiting requests (gateway compatibility).",
            labels=["running_lora_adapters", "waiting_lora_adapters", "max_lora"],
        )
        running, waiting = state.running_adapters, state.waiting_adapters
        if not self.names:
            running = waiting = ()
        lora.add_metric(
            [",".join(running), ",".join(waiting), str(state.adapters.slots_total)],
            state.updated_at,
        )
        yield lora


class Metrics:
    """The metric objects; `attach_live` adds the scrape-time gauges once an engine exists.

    names: put tenant and adapter names in labels (the server's default is not to).
    process: add Prometheus's standard process_* (CPU, memory, file descriptors), python_info
    and python_gc_* collectors (a server has them; tests that build many Metrics need not)."""

    def __init__(
        self, registry: CollectorRegistry | None = None, names: bool = True, process: bool = False
    ) -> None:
        self.registry = registry or CollectorRegistry()
        self.names = names
        r = self.registry
        if process:
            ProcessCollector(registry=r)
            PlatformCollector(registry=r)
            GCCollector(registry=r)
        self.requests_received = Counter(
            "loraserve_requests_received", "Generation requests accepted.", ["tenant"], registry=r
        )
        self.requests_finished = Counter(
            "loraserve_requests_finished",
            "Generation requests that ended, by finish reason (error: failed in the engine).",
            ["tenant", "finish_reason"],
            registry=r,
        )
        self.responses = Counter(
            "loraserve_grpc_responses",
            "Generation calls that ended, by method and status code.",
            ["method", "code"],
            registry=r,
        )
        self.requests_rejected = Counter(
            "loraserve_requests_rejected",
            "Requests refused, or dropped when their deadline passed, by reason.",
            ["reason"],
            registry=r,
        )
        self.time_to_first_token = Histogram(
            "loraserve_time_to_first_token_seconds",
            "From arrival to the first generated token.",
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.inter_token_latency = Histogram(
            "loraserve_inter_token_latency_seconds",
            "Between consecutive generated tokens of one request.",
            buckets=ITL_BUCKETS,
            registry=r,
        )
        self.request_duration = Histogram(
            "loraserve_request_duration_seconds",
            "From arrival to the last event, end to end.",
            buckets=E2E_BUCKETS,
            registry=r,
        )
        self.queue_time = Histogram(
            "loraserve_queue_time_seconds",
            "From arrival to admission into the batch (includes waiting for an adapter).",
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.step_duration = Histogram(
            "loraserve_step_duration_seconds",
            "One model forward of the engine, by phase.",
            ["phase"],
            buckets=STEP_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter(
            "loraserve_prompt_tokens", "Prompt tokens of finished requests.", ["tenant"], registry=r
        )
        self.generated_tokens = Counter(
            "loraserve_generated_tokens", "Tokens generated.", ["tenant"], registry=r
        )
        self.draft_tokens = Counter(
            "loraserve_draft_tokens",
            "Drafted tokens fed to the model for checking, by whether they were kept (accepted: "
            "what greedy decoding chose; rejected: wasted work).",
            ["result"],
            registry=r,
        )
        self.step_tokens = Histogram(
            "loraserve_step_tokens",
            "Tokens fed to the model in one engine step.",
            buckets=COUNT_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "loraserve_batch_size",
            "Sequences in one engine step.",
            buckets=COUNT_BUCKETS[:9],
            registry=r,
        )
        self.adapter_load_seconds = Histogram(
            "loraserve_adapter_load_seconds",
            "Loading an adapter into a tier (host: from disk; device: into a slot).",
            ["tier"],
            buckets=LOAD_BUCKETS,
            registry=r,
        )
        self.adapter_load_failures = Counter(
            "loraserve_adapter_load_failures",
            "Adapter loads that failed, by reason.",
            ["reason"],
            registry=r,
        )
        self.adapter_uploads = Counter(
            "loraserve_adapter_uploads", "Adapter uploads, by result.", ["result"], registry=r
        )
        self.adapter_upload_bytes = Counter(
            "loraserve_adapter_upload_bytes", "Bytes of adapters published.", registry=r
        )
        self.constraint_lookups = Counter(
            "loraserve_constraint_lookups",
            "Constrained requests by what their constraint needed (hit: cached, compiled, "
            "refused).",
            ["result"],
            registry=r,
        )
        self.constraint_compile_seconds = Histogram(
            "loraserve_constraint_compile_seconds",
            "Compiling one constraint against the tokenizer (refused ones included).",
            buckets=LOAD_BUCKETS,
            registry=r,
        )
        self.build_info = Info("loraserve_build", "What this server runs.", registry=r)
        for tier in TIERS:  # export zeros from the start, so rates exist before traffic
            self.adapter_load_seconds.labels(tier)
        for result in ("accepted", "rejected"):
            self.draft_tokens.labels(result)

    def tenant_label(self, tenant: str) -> str:
        """The `tenant` label's value for `tenant`: itself, or "" when names are kept out."""
        return tenant if self.names else ""

    def attach_live(self, live: Callable[[], LiveState], gateway: bool = True) -> None:
        self.registry.register(_LiveCollector(live, gateway, self.names))
