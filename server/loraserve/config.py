"""Configuration: frozen dataclasses built once at start-up and passed down.

`build_server_config` merges flags, `LORASERVE_*` environment variables and a config file, with
that precedence. Knows nothing about argument parsing or file formats: the CLI reads those.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

# Far above what any tokenizer averages, so a prompt of max_context tokens always fits; a
# longer text could only be refused after tokenizing it, which is the work this bound avoids.
PROMPT_BYTES_PER_TOKEN = 32
TINY_MODEL_ID = "tiny-llama"


@dataclass(frozen=True)
class EngineConfig:
    """Everything the engine needs to load the base model and size its caches.

    model: a local HF directory or hub id; None serves the small built-in default model.
    double_quant: QLoRA's double quantization of the 4-bit block scales (nf4 / fp4).
    kv_cache_tokens: the KV budget in tokens, shared by all running sequences.
    max_context: the most tokens (prompt + generated) one request may hold.
    max_prompt_bytes: the longest prompt text accepted, in UTF-8 bytes, refused before it is
        tokenized (None: PROMPT_BYTES_PER_TOKEN bytes per token of max_context).
    max_step_tokens: the most tokens one engine step feeds the model (prefill is chunked to fit).
    max_waiting, max_waiting_tokens: the queue's bound in requests and in prompt tokens.
    device_slots: adapters resident on the device at once (slot 0, the base, is extra).
    host_cache_bytes: the host-RAM tier's budget for adapter weights ready to load.
    slot_patience_steps: steps a request waits for a slot before one is drained for it.
    lora_target_modules: restrict which modules get LoRA slots, by last name component
        (empty = every linear layer but the output embedding, and the input embedding).
    prefix_caching: share the KV of prompt prefixes a tenant already sent on the same adapter.
    max_constraint_bytes: the largest constraint (schema, regex, grammar, choices) accepted.
    constraint_cache_entries, constraint_cache_bytes: the compiled-constraint cache's bounds.
    constraint_compile_timeout_s: a constraint not compiled by then is refused.
    """

    model: str | None = None
    quantization: str = "nf4"
    double_quant: bool = False
    compute_dtype: str = "fp32"
    device: str = "auto"
    max_rank: int = 64
    device_slots: int = 8
    host_cache_bytes: int = 4 * 1024**3
    slot_patience_steps: int = 8
    lora_target_modules: tuple[str, ...] = ()
    kv_cache_tokens: int = 32768
    kv_block_size: int = 16
    max_context: int = 4096
    max_prompt_bytes: int | None = None
    max_batch_size: int = 64
    max_step_tokens: int = 2048
    max_waiting: int = 1024
    max_waiting_tokens: int = 1 << 20
    prefix_caching: bool = True
    max_constraint_bytes: int = 64 * 1024
    constraint_cache_entries: int = 256
    constraint_cache_bytes: int = 64 * 1024**2
    constraint_compile_timeout_s: float = 2.0

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, int) and not isinstance(value, bool) and value < 1:
                raise ValueError(f"{f.name} must be >= 1, got {value}")
        if not self.constraint_compile_timeout_s > 0:
            raise ValueError("constraint_compile_timeout_s must be > 0")
        if self.max_step_tokens < self.max_batch_size:
            raise ValueError("max_step_tokens must be >= max_batch_size (one token per sequence)")

    @property
    def prompt_bytes_limit(self) -> int:
        """max_prompt_bytes, or the default derived from max_context."""
        return self.max_prompt_bytes or PROMPT_BYTES_PER_TOKEN * self.max_context


@dataclass(frozen=True)
class ServerConfig:
    """The gRPC server's settings around one engine.

    adapters: (name, PEFT directory) pairs loaded at start-up, shared by every tenant.
    adapter_dir: the adapter store's root (uploads land here).
    api_keys: the API-keys file (keys, tenants, scopes, quotas); None runs single-tenant
        development mode. SIGHUP reads it again.
    metrics_port, metrics_host: serve Prometheus /metrics there (the host is loopback unless
        set); gateway_metrics adds the vllm:* gauges; metrics_names puts tenant and adapter
        names in labels (off: the tenant label is empty and the gateway gauge names no adapter).
    tls_cert, tls_key: PEM files to serve gRPC over TLS; tls_client_ca: also require client
        certificates signed by this CA (mTLS).
    upload_idle_timeout_seconds: an upload whose next message takes longer is aborted.
    http_port: serve the OpenAI-compatible HTTP API there too, on `host` (None: off).
    served_model_name: the base model's `model` in that API (None: what `engine.model` says).
    store_refresh_ms: how often this process catches up with what other processes sharing
        `adapter_dir` changed (`latest` moves, listings, quotas); see `adapters/store.py`.
    """

    engine: EngineConfig = EngineConfig()
    host: str = "127.0.0.1"
    port: int = 50051
    default_max_new_tokens: int = 64
    drain_grace_seconds: float = 30.0
    max_message_bytes: int = 4 * 1024 * 1024
    adapters: tuple[tuple[str, str], ...] = ()
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"
    gateway_metrics: bool = True
    metrics_names: bool = False
    adapter_dir: str = "adapters"
    api_keys: str | None = None
    max_upload_bytes: int = 2 * 1024**3
    upload_idle_timeout_seconds: float = 30.0
    store_refresh_ms: int = 500
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_client_ca: str | None = None
    http_port: int | None = None
    served_model_name: str | None = None

    def __post_init__(self) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together: give both, or neither")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("tls_client_ca (mTLS) needs tls_cert and tls_key too")
        for name in ("upload_idle_timeout_seconds", "drain_grace_seconds", "store_refresh_ms"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")

    @property
    def model_name(self) -> str:
        return self.engine.model or "built-in tiny-llama (random weights)"

    @property
    def base_model_id(self) -> str:
        """The base model's `model` in the OpenAI-compatible API."""
        return self.served_model_name or self.engine.model or TINY_MODEL_ID

    def describe(self) -> dict[str, object]:
        """Every setting, for the start-up log (no secrets are held here)."""
        described = {f.name: getattr(self.engine, f.name) for f in fields(self.engine)}
        described.update(
            {f.name: getattr(self, f.name) for f in fields(self) if f.name != "engine"}
        )
        return described


def build_server_config(
    flags: Mapping[str, Any], environ: Mapping[str, str], file_values: Mapping[str, Any]
) -> ServerConfig:
    """Merge settings with precedence flags > environment (LORASERVE_<NAME>) > file > default.

    Each source maps setting names (the dataclass field names) to values; flags left unset
    are None. Environment values are parsed to the field's type.
    """
    engine_fields = {f.name: f for f in fields(EngineConfig)}
    server_fields = {f.name: f for f in fields(ServerConfig) if f.name != "engine"}
    unknown = set(file_values) - set(engine_fields) - set(server_fields)
    if unknown:
        raise ValueError(f"unknown settings in the config file: {', '.join(sorted(unknown))}")
    values: dict[str, Any] = {}
    for name, f in {**engine_fields, **server_fields}.items():
        env = environ.get(f"LORASERVE_{name.upper()}")
        if flags.get(name) is not None:
            values[name] = flags[name]
        elif env is not None:
            values[name] = _parse(env, str(f.type), name)
        elif name in file_values:
            values[name] = file_values[name]
    if "adapters" in values:
        values["adapters"] = tuple(_adapter_pair(a) for a in values["adapters"])
    if "lora_target_modules" in values:
        values["lora_target_modules"] = tuple(values["lora_target_modules"])
    engine = EngineConfig(**{k: v for k, v in values.items() if k in engine_fields})
    return ServerConfig(engine=engine, **{k: v for k, v in values.items() if k in server_fields})


def _parse(text: str, annotation: str, name: str) -> Any:
    """An environment value as the field's annotated type ("int | None", "tuple[str, ...]")."""
    kind = annotation.split("[")[0].split(" | ")[0]
    try:
        if kind == "bool":
            return text.lower() in ("1", "true", "yes")
        if kind == "int":
            return int(text)
        if kind == "float":
            return float(text)
    except ValueError as e:
        raise ValueError(f"LORASERVE_{name.upper()}={text!r} is not a valid {kind}") from e
    if kind == "tuple":
        return tuple(item for item in text.split(",") if item)
    return text


def _adapter_pair(item: str | Sequence[str]) -> tuple[str, str]:
    if isinstance(item, str):
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"adapter {item!r} must look like NAME=DIRECTORY")
        return name, path
    pair = tuple(item)
    if len(pair) != 2:
        raise ValueError(f"adapter {item!r} must be a [name, directory] pair")
    return str(pair[0]), str(pair[1])
