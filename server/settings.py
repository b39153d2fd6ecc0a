"""The server's settings: the one place flags and environment variables are read.

Every field is a command-line flag (`--max-batch-size 8`) and an environment variable
(`PREFIX_SERVE_MAX_BATCH_SIZE=8`); a flag wins over the variable, which wins over the default.
Tests build `Settings(...)` directly with keyword arguments. The command line itself is parsed by
`server/cli_args.py` (flags, help text, one-line errors).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

MIB = 1024 * 1024
ENV_PREFIX = "PREFIX_SERVE_"
DEFAULT_DATA_DIR = Path("~/.local/share/prefix-serve")


class Settings(BaseSettings):
    """Everything `prefix-serve` can be told, validated once at startup."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        extra="forbid",
    )

    # --- the model
    model: str = Field(
        description="Hugging Face model id or local model directory",
        json_schema_extra={"metavar": "ID_OR_DIR"},
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        default="auto", description="weights dtype (auto: the checkpoint's; float32 on CPU)"
    )
    device: str = Field(default="auto", description="auto, cpu, cuda or cuda:N")
    threads: int = Field(
        default=0, ge=0, description="CPU threads for torch; on a shared CPU 1-2 is often "
        "fastest", json_schema_extra={"shown_default": "0: torch's default"},
    )
    served_model_name: str | None = Field(
        default=None, description="the base model's name in the OpenAI API",
        json_schema_extra={"metavar": "NAME",
                           "shown_default": "the model directory's name, or the hub id"},
    )
    # --- the HTTP server
    host: str = Field(default="127.0.0.1", description="address to listen on")
    port: int = Field(default=8000, ge=0, le=65535, description="port to listen on")
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        default="info", description="log level"
    )
    # --- the registry
    redis_url: str | None = Field(
        default=None, description="Redis URL of the shared registry",
        json_schema_extra={"metavar": "URL", "shown_default": "unset: the embedded store"},
    )
    data_dir: Path = Field(default=DEFAULT_DATA_DIR, description="embedded store's directory")
    namespace: str = Field(
        default="prefix-serve", min_length=1, description="key namespace inside Redis"
    )
    max_upload_mb: float = Field(default=64.0, gt=0, description="largest prefix upload (MiB)")
    redis_max_connections: int = Field(
        default=100, ge=1, le=100_000, description="Redis connections per process; beyond "
        "them a request waits (--redis-pool-timeout-s) for a free one",
    )
    redis_pool_timeout_s: float = Field(
        default=5.0, gt=0, le=600, description="how long a request waits for a free Redis "
        "connection before 503 registry_unavailable",
    )
    # --- requests
    max_body_mb: float = Field(
        default=4.0, gt=0, le=1024, description="largest JSON request body (MiB); uploads "
        "have --max-upload-mb",
    )
    body_timeout_s: float = Field(
        default=60.0, gt=0, le=3600, description="a request body must arrive whole within this "
        "many seconds (408 otherwise)",
    )
    auth_cache_ttl_s: float = Field(
        default=30.0, ge=0, le=86_400, description="how long a verified tenant key is trusted "
        "before the registry is asked again (revocations arrive at once over pub/sub; this "
        "bounds them when pub/sub is down)",
    )
    max_prompts_per_request: int = Field(
        default=64, ge=1, le=4096, description="prompts one /v1/completions request may batch "
        "(`prompt` as a list); each is its own engine request and counts in every quota",
    )
    sse_keepalive_s: float = Field(
        default=0.0, ge=0, le=3600, description="a stream that has sent nothing for this many "
        "seconds (e.g. waiting in the queue) gets a `: keep-alive` comment, so proxies that cut "
        "idle connections keep it; 0: never, as OpenAI and vLLM (vLLM's benchmark client loses "
        "the event after a comment)",
    )
    # --- connections and uploads (docs/security.md)
    header_timeout_s: float = Field(
        default=10.0, gt=0, le=3600, description="a request's line and headers must arrive "
        "within this many seconds of the connection opening or of the previous response (408 "
        "and close otherwise)",
    )
    max_header_kb: int = Field(
        default=32, ge=1, le=1024, description="largest request line plus headers (KiB); over "
        "it, 431 and close",
    )
    max_connections: int = Field(
        default=4096, ge=8, le=1_000_000, description="open connections; at the limit a new "
        "one closes the longest-idle one, and is refused (503) only when all have a request "
        "in progress (lowered to fit the open-files limit, logged)",
    )
    max_connections_per_ip: int | None = Field(
        default=None, ge=1, le=1_000_000, description="open connections from one client "
        "address; beyond, 503 (behind a proxy every client shares the proxy's address)",
        json_schema_extra={"metavar": "N", "shown_default": "unset: no cap"},
    )
    max_concurrent_uploads: int = Field(
        default=4, ge=1, le=1024, description="prefix uploads read and imported at once (each "
        "holds up to --max-upload-mb in memory); beyond, 429",
    )
    max_concurrent_uploads_per_tenant: int = Field(
        default=2, ge=1, le=1024, description="prefix uploads of one tenant at once (the "
        "operator key counts as one tenant); beyond, 429",
    )
    # --- the engine
    max_batch_size: int = Field(default=256, ge=1, description="most requests running at once")
    max_queue: int = Field(default=1024, ge=1, description="waiting requests before 429")
    max_num_batched_tokens: int = Field(
        default=2048, ge=1, description="tokens per engine step: decode rows plus prompt chunks"
    )
    kv_cache_mb: float | None = Field(
        default=None, gt=0, description="KV pool size in MiB",
        json_schema_extra={"metavar": "MIB", "shown_default": "a share of the memory free "
                           "after loading: --gpu-memory-utilization or --cpu-kv-fraction"},
    )
    gpu_memory_utilization: float = Field(
        default=0.9, gt=0, le=1, description="CUDA: share of the device memory the server may use"
    )
    cpu_kv_fraction: float = Field(
        default=0.5, gt=0, le=1, description="CPU: share of the available RAM for the KV pool"
    )
    block_size: int = Field(default=16, ge=1, le=1024, description="tokens per KV block")
    admission_lookahead_tokens: int = Field(
        default=64, ge=0, le=1_000_000,
        description="admit a request only if every running request can still grow by this many "
        "tokens (0: admit whatever fits now and preempt when memory runs out)",
    )
    attention_backend: Literal["auto", "torch"] = Field(
        default="auto", description="paged attention implementation"
    )
    output_thread: Literal["auto", "on", "off"] = Field(
        default="auto", description="detokenize and deliver text on a thread of its own (auto: "
        "yes, unless on the CPU with torch threads taking every core)"
    )
    prefix_cache_mb: float = Field(
        default=256.0, gt=0, description="host memory for prefix tensors read from the registry"
    )
    max_seq_len: int | None = Field(
        default=None, ge=2, description="prefix+prompt+output per request",
        json_schema_extra={"metavar": "TOKENS",
                           "shown_default": "the model's context"},
    )
    # --- fairness between tenants (docs/tenants.md)
    fairness: Literal["vtc", "fifo"] = Field(
        default="vtc", description="who is admitted next when the engine is full: vtc "
        "(the least-served tenant, in weighted tokens) or fifo (arrival order)",
    )
    fair_prompt_weight: float = Field(
        default=1.0, ge=0, le=1e6, description="vtc: service counted per prompt token"
    )
    fair_output_weight: float = Field(
        default=2.0, ge=0, le=1e6, description="vtc: service counted per generated token"
    )
    # --- scaling out (Ray Serve; docs/scaling.md)
    replicas: int | None = Field(
        default=None, ge=1, le=1024, description="serve with N engine replicas on Ray Serve",
        json_schema_extra={"shown_default": "unset: one process, no Ray"},
    )
    ray_address: str | None = Field(
        default=None, description="with --replicas: join this Ray cluster ('auto', "
        "'ray://head:10001')", json_schema_extra={"metavar": "ADDRESS",
                                                  "shown_default": "unset: a local cluster"},
    )
    ingress_replicas: int = Field(default=1, ge=1, le=1024, description="with --replicas: "
                                  "HTTP ingress replicas (more than 1 needs --redis-url)")
    replica_cpus: float = Field(default=1.0, ge=0, description="CPUs reserved per engine replica")
    replica_gpus: float | None = Field(
        default=None, ge=0, description="GPUs per engine replica",
        json_schema_extra={"shown_default": "1 when this machine has CUDA and --device is not "
                           "cpu, else 0"},
    )
    max_prefixes_per_replica: int | None = Field(
        default=None, ge=1, le=65536, description="prefixes an engine replica keeps loaded "
        "and advertises to the router (Ray Serve multiplexing LRU)",
        json_schema_extra={"shown_default": "as many 32-token prefixes as --prefix-cache-mb "
                           "holds on the device"},
    )
    # --- each tenant's quota, unless the operator set another (docs/tenants.md)
    tenant_weight: float = Field(
        default=1.0, ge=0.001, le=1000, description="fair-share weight of a tenant"
    )
    tenant_max_running: int | None = Field(
        default=None, ge=1, le=1_000_000, description="requests of one tenant running at once",
        json_schema_extra={"metavar": "N", "shown_default": "unset: no cap"},
    )
    tenant_max_queued: int | None = Field(
        default=None, ge=1, le=1_000_000, description="requests of one tenant waiting; beyond "
        "it that tenant gets 429", json_schema_extra={"metavar": "N",
                                                      "shown_default": "unset: --max-queue"},
    )
    tenant_tokens_per_minute: int | None = Field(
        default=None, ge=1, le=10**12, description="prompt + generated tokens per minute of one "
        "tenant", json_schema_extra={"metavar": "N", "shown_default": "unset: no limit"},
    )
    tenant_max_prefixes: int | None = Field(
        default=None, ge=0, le=10**9, description="prefix names one tenant may store",
        json_schema_extra={"metavar": "N", "shown_default": "unset: no limit"},
    )
    tenant_max_stored_mb: float | None = Field(
        default=None, ge=0, le=2**33, description="prefix tensor bytes one tenant may store (MiB)",
        json_schema_extra={"metavar": "MIB", "shown_default": "unset: no limit"},
    )
    tenant_quota_ttl_s: float = Field(
        default=5.0, ge=0, le=3600, description="how long a server uses a tenant's quota before "
        "reading it from the registry again (a change made through this server applies at once)",
    )
    # --- private metrics and the tokenizer pool (docs/security.md)
    metrics_port: int | None = Field(
        default=None, ge=0, le=65535, description="also serve /metrics without a key on this "
        "port (--metrics-host); the main port's /metrics needs the operator key either way",
        json_schema_extra={"metavar": "PORT", "shown_default": "unset: no such listener"},
    )
    metrics_host: str = Field(
        default="127.0.0.1", description="address of the --metrics-port listener (its series "
        "name every tenant: keep it off public interfaces)",
    )
    tokenizer_threads: int = Field(
        default=2, ge=1, le=64, description="threads that tokenize prompts; one tenant uses at "
        "most one of them at a time, so its long prompts queue behind each other, not before "
        "another tenant's",
    )
    # --- auth and lifecycle
    admin_key: SecretStr | None = Field(
        default=None, description="the operator key (prefer the variable: `ps` shows flags)",
        json_schema_extra={"metavar": "KEY", "shown_default": "unset: required unless "
                           "--auth-disabled"},
    )
    auth_disabled: bool = Field(
        default=False, description="development only: no keys; everyone is 'default' + operator"
    )
    exit_on_engine_death: bool = Field(
        default=True, description="exit with status 1 once the engine died (/health is 503 "
        "either way), so a restart policy brings a fresh process",
    )
    shutdown_grace_s: float = Field(
        default=30.0, ge=0, description="on SIGTERM, how long running requests may finish"
    )

    @field_validator("data_dir")
    @classmethod
    def _expand(cls, value: Path) -> Path:
        return value.expanduser()

    @model_validator(mode="after")
    def _shared_registry_for_ingress_replicas(self) -> Settings:
        if self.ingress_replicas > 1 and self.redis_url is None:
            raise ValueError(
                "--ingress-replicas above 1 needs --redis-url: the embedded store does not tell "
                "other processes about uploads"
            )
        return self

    @model_validator(mode="after")
    def _auth_configured(self) -> Settings:
        if not self.auth_disabled and not self.admin_key:
            raise ValueError(
                "no operator key: pass --admin-key (or PREFIX_SERVE_ADMIN_KEY), or --auth-disabled "
                "for local development"
            )
        return self

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * MIB)

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * MIB)

    @property
    def max_header_bytes(self) -> int:
        return self.max_header_kb * 1024

    @property
    def kv_cache_bytes(self) -> int | None:
        return None if self.kv_cache_mb is None else int(self.kv_cache_mb * MIB)

    @property
    def prefix_cache_bytes(self) -> int:
        return int(self.prefix_cache_mb * MIB)

    @property
    def tenant_max_stored_bytes(self) -> int | None:
        mb = self.tenant_max_stored_mb
        return None if mb is None else int(mb * MIB)

    @property
    def store_description(self) -> str:
        """Where prefixes live, for logs (the Redis URL without its password)."""
        if self.redis_url is None:
            return f"local directory {self.data_dir} (namespace {self.namespace})"
        return f"redis {_redact_url(self.redis_url)} (namespace {self.namespace})"


def _redact_url(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    creds, at, host = rest.rpartition("@")
    if not at:
        return url
    user = creds.split(":", 1)[0]
    return f"{scheme}{sep}{user}:***@{host}" if user else f"{scheme}{sep}***@{host}"
