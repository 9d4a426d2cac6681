"""Configuration: every setting declared once, typed and checked, built once at start-up and
passed down as frozen values.

`EngineConfig` holds what the engine needs, `ServerFields` what the server around it needs,
`ServerConfig` both. Each setting is one `setting(...)` line: its type, default, bounds and the
help text that the flag, the environment variable, the config-file key and
`docs/configuration.md` all share (`loraserve.settings` derives those). To add a setting, add
one line here.

Knows nothing about argument parsing, the environment or file formats: `loraserve.settings`
reads those.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, JsonValue, field_validator, model_validator

JsonDict = dict[str, JsonValue]

# Far above what any tokenizer averages, so a prompt of max_context tokens always fits; a
# longer text could only be refused after tokenizing it, which is the work this bound avoids.
PROMPT_BYTES_PER_TOKEN = 32
DEMO_MODEL_ID = "loraserve-demo"

Count = Annotated[int, Field(ge=1)]
Seconds = Annotated[float, Field(gt=0)]
Port = Annotated[int, Field(ge=1, le=65535)]
Text = Annotated[str, Field(min_length=1)]
ModuleName = Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")]


def setting(
    default: Any, help: str, *, flag: str | None = None, bare: str | None = None, **bounds: Any
) -> Any:
    """One setting's declaration: default, help text, bounds (pydantic's `ge`, `pattern`, ...),
    when it is not `--<name-with-dashes>`, its flag, and the value its flag alone gives
    (`bare`: a setting that was a switch before it took values)."""
    extra: JsonDict = {"flag": flag} if flag else {}
    if bare is not None:
        extra["bare"] = bare
    return Field(default, description=help, json_schema_extra=extra or None, **bounds)


def _names(value: Any) -> Any:
    """A comma-separated string (an environment variable) or a list as a tuple of names."""
    if isinstance(value, str):
        return tuple(item for item in value.split(",") if item)
    return tuple(value) if isinstance(value, list) else value


def _adapter_pair(item: Any) -> tuple[str, str]:
    if isinstance(item, str):
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"adapter {item!r} must look like NAME=DIRECTORY")
        return name, path
    if isinstance(item, (list, tuple)) and len(item) == 2:
        return item[0], item[1]
    raise ValueError(f"adapter {item!r} must be NAME=DIRECTORY or a [name, directory] pair")


def _looks_like_path(model: str) -> bool:
    """A hub id is `name` or `org/name`; anything else names a local directory."""
    return model.startswith((".", "/", "~")) or model.count("/") > 1


def model_problem(model: str | None) -> str | None:
    """What is wrong with `model` on this machine (None: nothing). Not part of the schema: a
    deploy file or a Ray driver names paths of the machine the server will run on."""
    if model is None:
        return None
    path = Path(model).expanduser()
    if path.exists() and not (path / "config.json").is_file():
        return "is not a model directory (no config.json in it)"
    if not path.exists() and _looks_like_path(model):
        return "no such directory; give an HF model directory or a hub id"
    return None


class EngineConfig(BaseModel):
    """Everything the engine needs to load the base model and size its caches."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: Text | None = setting(
        None,
        "local HF model directory or hub id (default: the built-in demo model and its "
        "adapters, trained into the user's cache on first use)",
    )
    quantization: Literal["nf4", "fp4", "int8", "none"] = setting(
        "nf4", "how the base model's linear layers are stored"
    )
    double_quant: bool = setting(
        False,
        "double-quantize the 4-bit block scales (QLoRA's recipe; nf4 and fp4): about 0.4 bits "
        "less per weight",
    )
    quantize_output: Literal["off", "4bit", "int8"] = setting(
        "off",
        "hold the output projection (lm_head) quantized too, which bitsandbytes and PEFT keep in "
        "the compute dtype: 4bit in the base's format (nf4 or fp4; 0.28 of the bytes a decode "
        "step reads for it in bf16, 0.14 in fp32) or int8, one scale an output (CPUs; 0.5 and "
        "0.25, logits far closer to the unquantized ones'). Few streams run faster (one: up to "
        "1.5 times), but greedy outputs no longer match PEFT's (docs/performance.md); true and "
        "false (and the flag alone) mean 4bit and off",
        bare="4bit",
    )
    compute_dtype: Literal["fp32", "bf16", "fp16"] = setting(
        "fp32",
        "dtype of activations and LoRA weights (fp32: outputs token-exact with PEFT in fp32; bf16 "
        "is faster on GPUs, on CPUs with AMX and on AMD's with AVX512-BF16, whose start-up log "
        "says so)",
    )
    device: str = setting(
        "auto", "auto, cpu, cuda or cuda:N", pattern=r"^(auto|cpu|cuda(:[0-9]+)?)$"
    )
    compute_threads: Count | None = setting(
        None,
        "threads for the model's CPU arithmetic (default: torch's count, from OMP_NUM_THREADS "
        "or the physical cores, capped by the CPUs this process may use: its affinity mask and "
        "its cgroup's CPU quota); they spin about 0.1 ms after each parallel op before they "
        "sleep (GOMP_SPINCOUNT=10000, unless the environment sets GOMP_SPINCOUNT)",
        le=4096,
    )
    max_rank: Count = setting(64, "largest LoRA rank accepted")
    lora_slot_dtype: Literal["auto", "compute", "bf16"] = setting(
        "auto",
        "dtype of the device slots' LoRA A and B: auto (the compute dtype; under fp32 compute a "
        "module the adapter stores in bf16 or fp16 is held in that dtype within its slot: "
        "exact, and half the bytes a CPU decode step reads for it), compute (always the compute "
        "dtype), or bf16 under fp32 compute (half the slot memory as well; exact for adapters "
        "stored in bf16, others rounded to it)",
    )
    device_slots: Count = setting(
        8, "adapters resident on the device at once (slot 0, the base, is extra)"
    )
    host_cache_bytes: Count = setting(
        4 * 1024**3, "host-RAM budget for adapter weights ready to load"
    )
    slot_patience_steps: Count = setting(
        8, "engine steps a request waits for a slot before one is drained for it"
    )
    adaptive_threads: bool = setting(
        True,
        "run decode steps on fewer compute threads while other processes keep the CPUs busy "
        "(measured by how long each parallel op waits for its threads; probed again after a "
        "hold), so that a preempted thread does not stall every op; outputs do not change",
    )
    cuda_graphs: bool = setting(
        True,
        "on a GPU, replay decode steps from CUDA graphs, captured on first use per batch size "
        "and context length rounded up to powers of two: one launch instead of hundreds a step",
    )
    traced_decode_records: int = setting(
        16,
        "on a CPU, decode steps replay TorchScript records of the model's forward, one per "
        "range of row counts that take the same kernel paths (1-3, 4, 5-32, 33-128, 129-256; "
        "with adapters or without, with their DoRA or bias terms or without), made at start-up "
        "for every batch size up to max_batch_size (others the first time a step needs one), "
        "at most this many (each holds about 0.57 MB a decoder layer; "
        "steps of other keys run eagerly): the same kernels without the model's Python "
        "between them, the same outputs; 0: off",
        ge=0,
        le=1024,
    )
    lora_target_modules: tuple[ModuleName, ...] = setting(
        (),
        "modules that get LoRA slots, by last name component (repeatable; comma-separated in "
        "the environment; empty: every linear layer but the output embedding, and the input "
        "embedding)",
        flag="--lora-target-module",
    )
    kv_cache_tokens: Count = setting(
        32768, "KV cache budget in tokens, shared by all running sequences"
    )
    kv_block_size: Count = setting(16, "tokens per KV cache block")
    kv_cache_dtype: Literal["compute", "bf16", "fp16", "int8"] = setting(
        "compute",
        "dtype the KV cache holds keys and values in: the compute dtype, or bf16 or fp16 under "
        "fp32 compute (half the cache memory, and half the bytes a CPU decode step's attention "
        "reads; keys and values are rounded to it, so outputs are close to, not the same as, "
        "fp32's; fp16 keeps 3 more bits, bf16 fp32's range), or int8 (each token's head of "
        "keys or values quantized with one float32 scale: about a quarter of fp32's memory and "
        "bytes read, half of bf16's; outputs further from fp32's than a 16-bit cache's)",
    )
    max_context: Count = setting(4096, "most tokens (prompt + generated) one request may hold")
    max_prompt_bytes: Count | None = setting(
        None,
        f"longest prompt text in UTF-8 bytes, refused before tokenizing (default: "
        f"{PROMPT_BYTES_PER_TOKEN} x max_context)",
    )
    max_batch_size: Count = setting(64, "sequences in the running batch at most")
    max_step_tokens: Count = setting(
        2048, "tokens one engine step feeds the model at most (prefill is chunked to fit)"
    )
    speculative_tokens: int = setting(
        0,
        "tokens a greedy decode row drafts by prompt lookup (the tokens that followed the last "
        "earlier occurrence of its context's final 2-4 tokens) and has the model check in the "
        "same step, keeping those greedy decoding picks: the outputs of one token a step (in a "
        "16-bit compute dtype, as between batch sizes, they may part at a near tie); 0: off",
        ge=0,
        le=16,
    )
    speculative_max_rows: Count = setting(
        1,
        "decode rows a step may hold for its rows to draft: a step of more rows is less "
        "bound by its host work and weight reads, so checking drafts costs it more",
    )
    max_waiting: Count = setting(1024, "queued requests at most")
    max_waiting_tokens: Count = setting(1 << 20, "queued prompt tokens at most")
    prefix_caching: bool = setting(
        True, "share the KV of prompt prefixes a tenant already sent on the same adapter"
    )
    batch_invariant: bool = setting(
        False,
        "give every request's logits the same bits whatever requests share its steps and "
        "however its prompt is split into steps or found in the prefix cache: reproducible "
        "greedy and seeded outputs under any load, in fp32 or bf16 compute (the CPU kernels "
        "only: refused on a GPU, for int8 or fp16 weights and for attention with softcapping "
        "or sinks; batches 2-7% slower, one stream 1.4-1.5 times slower: "
        "docs/performance.md)",
    )
    max_constraint_bytes: Count = setting(
        64 * 1024, "largest constraint (schema, regex, grammar, choices) accepted"
    )
    constraint_cache_entries: Count = setting(256, "compiled constraints kept at most")
    constraint_cache_bytes: Count = setting(64 * 1024**2, "memory for compiled constraints at most")
    constraint_compile_timeout_s: Seconds = setting(
        2.0, "a constraint not compiled in this many seconds is refused"
    )

    @field_validator("lora_target_modules", mode="before")
    @classmethod
    def _split_modules(cls, value: Any) -> Any:
        return _names(value)

    @field_validator("quantize_output", mode="before")
    @classmethod
    def _output_format(cls, value: Any) -> Any:
        """The switch this setting was before it named a format: true is 4bit, false off."""
        switch = {"true": "4bit", "false": "off"}
        if isinstance(value, bool):
            return "4bit" if value else "off"
        return switch.get(value.lower(), value) if isinstance(value, str) else value

    @model_validator(mode="after")
    def _fits(self) -> EngineConfig:
        if self.max_step_tokens < self.max_batch_size:
            raise ValueError("max_step_tokens must be >= max_batch_size (one token per sequence)")
        return self

    @property
    def prompt_bytes_limit(self) -> int:
        """max_prompt_bytes, or the default derived from max_context."""
        return self.max_prompt_bytes or PROMPT_BYTES_PER_TOKEN * self.max_context


class ServerFields(BaseModel):
    """The gRPC server's settings around one engine."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    host: Text = setting("127.0.0.1", "address the gRPC server binds")
    port: Port = setting(50051, "gRPC port")
    http_port: Port | None = setting(
        None, "also serve the OpenAI-compatible HTTP API on this port, on host (default: off)"
    )
    served_model_name: Text | None = setting(
        None, "the base model's name in the HTTP API's `model` field (default: model)"
    )
    default_max_new_tokens: Count = setting(
        64, "tokens generated when a request does not say how many"
    )
    drain_grace_seconds: Seconds = setting(
        30.0, "on SIGTERM, how long calls in flight may take to finish"
    )
    max_message_bytes: Count = setting(4 * 1024 * 1024, "largest gRPC message, either way")
    adapters: tuple[tuple[Text, Text], ...] = setting(
        (),
        "NAME=DIR: a PEFT LoRA directory shared with every tenant at start-up (repeatable; "
        "comma-separated in the environment; [name, dir] pairs or NAME=DIR strings in the file)",
        flag="--adapter",
    )
    metrics_port: Port | None = setting(None, "serve Prometheus /metrics on this port")
    metrics_host: Text = setting(
        "127.0.0.1", "address /metrics binds (loopback unless set; it needs no key)"
    )
    gateway_metrics: bool = setting(True, "export the vllm:* gauges inference gateways scrape")
    metrics_names: bool = setting(
        False,
        "put tenant and adapter names in metric labels (gateway adapter affinity needs them; "
        "anyone who can scrape /metrics then sees every tenant's)",
    )
    rebuild_demo: bool = setting(
        False, "train the built-in demo afresh instead of using the cached one (no --model only)"
    )
    adapter_dir: Text = setting("adapters", "adapter store root (uploads land here)")
    store_refresh_ms: Count = setting(
        500,
        "how often this process catches up with what other processes sharing adapter_dir "
        "changed (latest versions, listings, quotas)",
    )
    api_keys: Text | None = setting(
        None,
        "API-keys JSON file (keys, tenants, scopes, quotas); SIGHUP reloads it; none: "
        "single-tenant development mode",
    )
    max_upload_bytes: Count = setting(2 * 1024**3, "largest adapter upload")
    upload_idle_timeout_seconds: Seconds = setting(
        30.0, "abort an upload whose next message takes longer"
    )
    tls_cert: Text | None = setting(None, "PEM certificate chain: serve gRPC over TLS")
    tls_key: Text | None = setting(None, "PEM private key of tls_cert")
    tls_client_ca: Text | None = setting(
        None, "PEM CA: require client certificates it signed (mTLS)"
    )
    log_format: Literal["text", "json"] = setting(
        "text", "log lines as text, or as one JSON object each (for log collectors)"
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = setting(
        "INFO", "least severe log level written"
    )

    @field_validator("adapters", mode="before")
    @classmethod
    def _pairs(cls, value: Any) -> Any:
        return tuple(_adapter_pair(item) for item in _names(value))

    @model_validator(mode="after")
    def _tls(self) -> ServerFields:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together: give both, or neither")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("tls_client_ca (mTLS) needs tls_cert and tls_key too")
        return self


class ServerConfig(ServerFields):
    engine: EngineConfig = EngineConfig()

    @property
    def model_name(self) -> str:
        return self.engine.model or f"the built-in demo ({DEMO_MODEL_ID})"

    @property
    def base_model_id(self) -> str:
        """The base model's `model` in the OpenAI-compatible API."""
        return self.served_model_name or self.engine.model or DEMO_MODEL_ID

    def describe(self) -> dict[str, object]:
        """Every setting, for the start-up log (no secrets are held here)."""
        return {**self.engine.model_dump(), **self.model_dump(exclude={"engine"})}
