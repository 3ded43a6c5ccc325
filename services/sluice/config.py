"""Typed, validated settings: one class per service, read from ``SLUICE_<SERVICE>_*``.

Every service process reads its settings here and nowhere else, e.g.
``SLUICE_RECALL_PORT=50061`` or ``SLUICE_GATEWAY_DEADLINE_MS=150``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from sluice.balancer import parse_target
from sluice.core.admission import AdmissionConfig
from sluice.core.auth import Guard, PeerPolicy, RateLimits, StorefrontAuth, server_credentials
from sluice.core.server import ServerOptions
from sluice.core.tracing import TracingConfig
from sluice.paths import default_artifacts, var


def _cpu_bound_workers() -> Any:
    """The ``workers`` field of a service whose handlers are CPU-bound Python."""
    return Field(
        4,
        ge=1,
        le=256,
        description="gRPC handler threads. The work is CPU-bound Python: a few threads serve "
        "requests in order, where many would time-slice the GIL and stretch every request "
        "(docs/benchmarks.md: p99 1.2 to 3.4 times lower with 2 to 4 threads than with 16)",
    )


class ServiceSettings(BaseSettings):
    """Fields every service has."""

    model_config = SettingsConfigDict(extra="ignore", frozen=True)

    artifacts: Path = Field(
        default_factory=default_artifacts,
        description="the build to serve (default: <home>/artifacts/default, sluice.paths)",
    )
    build_poll_s: float = Field(
        1.0,
        gt=0,
        le=300,
        description="with artifacts naming a build store: how often its CURRENT pointer is read "
        "(a newly published build is loaded in the background, then swapped in)",
    )
    build_retain_s: float = Field(
        30.0,
        ge=0,
        description="how long the previous build stays loaded after a swap, for requests "
        "pinned to it; longer than any request's deadline",
    )
    catalog_updates: str = Field(
        "",
        description="the live catalog update log this service follows (sluice.data.updates): "
        "a file path (one machine, or a shared volume), or redis://… / redis+cluster://… (a "
        "stream every host reads); empty: the build's catalog as it is. Every service of a "
        "deployment must name the same log",
    )
    catalog_room: int = Field(
        10_000,
        ge=0,
        le=10_000_000,
        description="with catalog_updates: items that can be added before the next build "
        "(each costs ~2.5 KB in every process that holds the catalog)",
    )
    catalog_poll_s: float = Field(
        0.2, gt=0, le=60, description="with catalog_updates: how often the log is read"
    )
    host: str = "127.0.0.1"
    port: int = Field(0, ge=0, le=65535)
    metrics_port: int = Field(0, ge=0, le=65535, description="Prometheus /metrics; 0 disables")
    health_port: int = Field(
        0,
        ge=0,
        le=65535,
        description="plaintext port with only the health service, for probes that cannot "
        "speak TLS (Kubernetes gRPC probes); 0 disables",
    )
    workers: int = Field(16, ge=1, le=256, description="gRPC handler threads")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    torch_threads: int = Field(1, ge=1, le=64)
    blas_threads: int = Field(
        1,
        ge=1,
        le=64,
        description="BLAS (numpy) and OpenMP (FAISS) threads: a stage's matrices are small and "
        "the cores shared",
    )

    max_request_bytes: int = Field(
        4 << 20,
        ge=1024,
        description="gRPC refuses a bigger request (RESOURCE_EXHAUSTED) before parsing it",
    )
    profile: Literal["development", "production"] = Field(
        "development", description="production: defaults for a deployment (reflection off)"
    )
    reflection: bool | None = Field(
        None, description="serve gRPC reflection (v1 and v1alpha); unset: on in development"
    )

    admission: bool = Field(
        True,
        description="refuse requests beyond an adaptive concurrency limit (RESOURCE_EXHAUSTED "
        "with RetryInfo) instead of queueing them past their deadline",
    )
    admission_target_ms: float = Field(
        50.0, gt=0, description="average latency of admitted requests the limit steers to"
    )
    admission_max: int = Field(64, ge=1, le=1024, description="highest concurrency limit")

    tls_cert_file: Path | None = Field(None, description="PEM certificate: serve TLS")
    tls_key_file: Path | None = Field(None, description="PEM private key of tls_cert_file")
    tls_client_ca_file: Path | None = Field(
        None, description="require a client certificate signed by this CA (mTLS)"
    )
    allowed_peers: list[str] = Field(
        default_factory=list,
        description="client certificate identities (CN or SAN) allowed to call; empty: any "
        "certificate the CA signed (needs tls_client_ca_file)",
    )

    otlp_endpoint: str | None = Field(
        None,
        description="OpenTelemetry collector (OTLP/gRPC) that receives this service's spans: "
        "http://host:4317 (plaintext) or https://host:4317 (TLS); unset: no tracing",
    )
    otlp_ca_file: Path | None = Field(
        None, description="verify an https:// collector with this CA (default: system roots)"
    )
    trace_sample_ratio: float = Field(
        1.0,
        ge=0.0,
        le=1.0,
        description="share of new traces recorded; a caller's traceparent decides for its own",
    )
    trace_service_name: str | None = Field(
        None, description="service.name of the spans; unset: sluice-<service>"
    )
    trace_export_delay_ms: int = Field(
        5000, ge=1, le=60_000, description="longest a finished span waits before its batch goes"
    )

    @field_validator("otlp_endpoint")
    @classmethod
    def _otlp_scheme(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError("otlp_endpoint must start with http:// (plaintext) or https:// (TLS)")
        return value

    @model_validator(mode="after")
    def _tls_pairs(self) -> ServiceSettings:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file go together")
        if self.tls_client_ca_file and not self.tls_cert_file:
            raise ValueError("tls_client_ca_file needs tls_cert_file and tls_key_file")
        if self.allowed_peers and not self.tls_client_ca_file:
            raise ValueError("allowed_peers needs tls_client_ca_file (mTLS)")
        if self.otlp_ca_file and not (self.otlp_endpoint or "").startswith("https://"):
            raise ValueError("otlp_ca_file needs an https:// otlp_endpoint")
        return self

    def guard(self) -> Guard | None:
        """The caller checks this service runs before any work."""
        return Guard(peers=PeerPolicy(self.allowed_peers)) if self.allowed_peers else None

    def admission_config(self) -> AdmissionConfig | None:
        if not self.admission:
            return None
        return AdmissionConfig(
            target_ms=self.admission_target_ms,
            initial=min(self.server_workers(), self.admission_max),
            max_limit=self.admission_max,
        )

    def tracing_config(self) -> TracingConfig | None:
        """OpenTelemetry export (``core.tracing``); None unless an endpoint is set."""
        if self.otlp_endpoint is None:
            return None
        return TracingConfig(
            endpoint=self.otlp_endpoint,
            service_name=self.trace_service_name or "",
            sample_ratio=self.trace_sample_ratio,
            export_delay_ms=self.trace_export_delay_ms,
            ca_file=self.otlp_ca_file,
        )

    def serves_reflection(self) -> bool:
        return self.reflection if self.reflection is not None else self.profile == "development"

    def server_options(self) -> ServerOptions:
        return ServerOptions(
            host=self.host,
            port=self.port,
            metrics_port=self.metrics_port,
            workers=self.server_workers(),
            max_request_bytes=self.max_request_bytes,
            reflection=self.serves_reflection(),
            admission=self.admission_config(),
            credentials=server_credentials(
                self.tls_cert_file, self.tls_key_file, self.tls_client_ca_file
            )
            if self.tls_cert_file and self.tls_key_file
            else None,
            guard=self.guard(),
            health_port=self.health_port,
            tracing=self.tracing_config(),
        )

    def server_workers(self) -> int:
        """The gRPC handler threads this service runs with."""
        return self.workers


class StageSettings(ServiceSettings):
    """Fields every stage service has."""

    max_candidates: int = Field(
        4000,
        ge=1,
        description="largest max_candidates a caller may ask for, and most candidates in",
    )
    deadline_ms: int = Field(
        1000, ge=1, description="the budget of a call whose caller set no deadline"
    )


class RecallSettings(StageSettings):
    model_config = SettingsConfigDict(env_prefix="SLUICE_RECALL_")
    port: int = 50061
    workers: int = _cpu_bound_workers()
    max_candidates: int = Field(2000, ge=1, description="largest budget a caller may ask for")
    use_gpu: bool | None = Field(None, description="FAISS on GPU; None: when faiss sees a GPU")
    state: Literal["embedded", "redis"] = Field(
        "embedded", description="redis: blend live popularity from the shared state store"
    )
    redis_url: str = Field(
        "redis://127.0.0.1:6379/0",
        description="the shared state store: redis://host:port/db (one server) or "
        "redis+cluster://host:port[,host:port...] (a Redis Cluster, found from those seeds; "
        "rediss+cluster:// with TLS)",
    )
    live_popularity_refresh_s: float = Field(
        1.0, gt=0.0, le=60.0, description="how often live popularity is read from the store"
    )
    live_popularity_weight: float = Field(
        0.7, ge=0.0, le=1.0, description="most weight live popularity gets over build-time counts"
    )
    shard: int | None = Field(
        None,
        ge=0,
        description="serve shard i of the build's sharded catalog (RecallShardService) instead "
        "of the whole catalog; see sluice.recall.shards",
    )
    shard_addrs: str = Field(
        "",
        description="a recall front over a sharded catalog: the shards' gRPC targets in shard "
        "order, ';'-separated (each a stage address: host:port, several replicas, or dns:///); "
        "'local': every shard in this process",
    )
    shard_attempts: int = Field(
        2, ge=1, le=5, description="tries of a shard call that meets UNAVAILABLE (replicas)"
    )
    shard_wait_s: float = Field(
        600.0, gt=0, description="how long the front waits for every shard to load a build"
    )
    shard_tls_ca_file: Path | None = Field(None, description="verify the shards' TLS with this CA")
    shard_tls_cert_file: Path | None = Field(None, description="client certificate for the shards")
    shard_tls_key_file: Path | None = Field(None, description="its private key")

    @property
    def shard_targets(self) -> list[str]:
        """The shards' addresses, in shard order (empty: not a front, or 'local')."""
        if self.shard_addrs.strip() in ("", "local"):
            return []
        return [part.strip() for part in self.shard_addrs.split(";")]

    @field_validator("shard_addrs")
    @classmethod
    def _shard_targets(cls, value: str) -> str:
        if value.strip() not in ("", "local"):
            for part in value.split(";"):
                parse_target(part)  # ValueError names what is wrong
        return value

    @model_validator(mode="after")
    def _shard_or_front(self) -> RecallSettings:
        if self.shard is not None and self.shard_addrs:
            raise ValueError("a recall process is a shard or a front (shard_addrs), not both")
        if self.catalog_updates and (self.shard is not None or self.shard_addrs):
            raise ValueError(
                "live catalog updates (catalog_updates) need an unsharded recall: a sharded "
                "catalog takes them at its next build"
            )
        return self


class CoarseSettings(StageSettings):
    model_config = SettingsConfigDict(env_prefix="SLUICE_COARSE_")
    port: int = 50062
    workers: int = _cpu_bound_workers()


class FineSettings(StageSettings):
    model_config = SettingsConfigDict(env_prefix="SLUICE_FINE_")
    port: int = 50063
    backend: Literal["triton", "onnx", "torch"] = Field(
        "triton",
        description="triton: the model on Triton (dynamic batching, GPUs); onnx: the build's "
        "model.onnx on ONNX Runtime in this process, no Triton (torch_threads threads); "
        "torch: the torch model in this process (needs torch, which the service image lacks)",
    )
    triton_url: str = "127.0.0.1:8001"
    triton_tls_ca_file: Path | None = Field(None, description="verify Triton's gRPC TLS")
    triton_tls_cert_file: Path | None = Field(None, description="client certificate for Triton")
    triton_tls_key_file: Path | None = Field(None, description="its private key")
    model_name: str = Field(
        "fine_ranker",
        description="the Triton model the stage calls: the build's ranker, or any model that "
        "declares the ranker contract (sluice.fine.contract), checked at warm-up",
    )
    model_version: str | None = Field(
        None,
        description="its Triton version; unset: the build's version for fine_ranker, the "
        "newest loaded for any other model",
    )
    arm_models: list[str] = Field(
        default_factory=list,
        description="other Triton rankers an experiment arm may ask for, as a JSON list of "
        '"name" or "name:version" (fine_ranker without a version: the build\'s); each must '
        "declare the ranker contract, checked at warm-up like model_name",
    )
    triton_wait_s: float = Field(
        300.0, gt=0, description="how long warm-up waits for Triton to load the model"
    )

    @field_validator("arm_models")
    @classmethod
    def _model_specs(cls, value: list[str]) -> list[str]:
        from sluice.domain import MODEL_SPEC

        for spec in value:
            if not MODEL_SPEC.fullmatch(spec):
                raise ValueError(f'arm model {spec!r} is not "name" or "name:version"')
        return value

    max_candidates: int = Field(1024, ge=1)


class RerankSettings(StageSettings):
    model_config = SettingsConfigDict(env_prefix="SLUICE_RERANK_")
    port: int = 50064
    workers: int = _cpu_bound_workers()
    diversity_lambda: float = Field(0.85, ge=0.0, le=1.0)
    search_diversity_lambda: float = Field(
        1.0,
        ge=0.0,
        le=1.0,
        description="the MMR lambda of search requests (1.0: relevance order, the brand cap "
        "still applies); diversity_lambda, and an experiment arm's, are for recommendations",
    )
    max_per_brand: int = Field(4, ge=0)
    exposure_tail_share: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="FA*IR target share of long-tail providers' items in every page prefix "
        "(sluice.rerank.exposure); 0 disables the exposure target",
    )
    exposure_alpha: float = Field(
        0.1, gt=0.0, lt=1.0, description="FA*IR significance of the per-prefix test"
    )
    exposure_head_share: float = Field(
        0.8,
        gt=0.0,
        le=1.0,
        description="the head: the most popular providers that together hold this share of "
        "the training interactions; the rest is the long tail",
    )


class GatewaySettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="SLUICE_GATEWAY_")
    port: int = 50051
    admission_target_ms: float = Field(
        80.0,
        gt=0,
        description="average latency of admitted requests the limit steers to: a third of the "
        "default 250 ms budget, so that admitted requests keep their p99 within it",
    )
    max_request_bytes: int = Field(
        1 << 20,
        ge=1024,
        description="a storefront request needs a few KiB; Track's 1000 events fit in 1 MiB",
    )
    # Each stage address is a gRPC target (sluice.balancer): one host:port (gRPC's defaults,
    # as always), or several replicas: ipv4:a:p,b:p (or the bare list a:p,b:p) or
    # dns:///name:port (every address of the name) get round_robin, health checks, retries.
    recall_addr: str = "127.0.0.1:50061"
    coarse_addr: str = "127.0.0.1:50062"
    fine_addr: str = "127.0.0.1:50063"
    rerank_addr: str = "127.0.0.1:50064"
    packed_candidates: bool = Field(
        True,
        description="candidates travel to and from the stage services as packed arrays "
        "(CANDIDATE_ENCODING_PACKED), read without an object per candidate; stages older "
        "than this field do not know them: upgrade the stages first, or set false",
    )
    stage_attempts: int = Field(
        3,
        ge=1,
        le=5,
        description="with several replicas behind a stage address: tries of a stage call that "
        "meets UNAVAILABLE (each on the next healthy replica, within the call's deadline); "
        "1: no retries",
    )
    query_encoder: Literal["fp32", "int8"] = Field(
        "int8",
        description="precision of the MiniLM query encoder: int8 (the build's quantized "
        "export; a build without one falls back to fp32) costs about half the CPU per "
        "uncached query, and served CrowdFlower search quality is the same within its "
        "interval (docs/benchmarks.md); item vectors stay fp32 either way",
    )
    spell_correction: bool = Field(
        True,
        description="search a query word the catalog never uses (nor its stem) as the "
        "catalog word one typo away (sluice.gateway.spelling); the response's searched_query "
        "says what was searched",
    )
    deadline_ms: int = Field(250, ge=1, description="used when the caller sets no deadline")
    min_deadline_ms: int = Field(5, ge=1, description="below this nothing is attempted")
    build_switch_wait_s: float = Field(
        600.0,
        gt=0,
        description="how long a newly published build waits for every stage service to load "
        "it before the gateway gives up on it (and tries again later); meanwhile the current "
        "build keeps serving",
    )
    recall_candidates: int = Field(1000, ge=10)
    coarse_candidates: int = Field(200, ge=10)
    fine_candidates: int = Field(200, ge=1)
    max_page_size: int = Field(100, ge=1)
    page_token_keys: list[SecretStr] = Field(
        default_factory=list,
        description="HMAC keys for page tokens, as a JSON list: the first signs, all verify "
        "(rotate by putting the new key first). Every replica needs the same list; empty: a "
        "random key per process",
    )
    max_query_chars: int = Field(512, ge=1)
    rules_file: Path | None = Field(
        None,
        description="the merchant's rules (blocks, age-restricted categories, query list, pins, "
        "boosts; sluice.rules): a JSON file, re-read when it changes. A file that does not "
        "parse stops the start; a bad change later is logged and the rules in force stay",
    )
    rules_poll_s: float = Field(1.0, gt=0, le=60, description="how often the rules file is checked")
    experiments_file: Path | None = Field(
        None,
        description="the experiments file (sluice.experiments): arms per user by a salted "
        "hash, re-read when it changes (every rules_poll_s)",
    )
    shadow_log_dir: Path | None = Field(
        None,
        description="where shadow arms' pages are logged (shadow-<pid>.jsonl); unset: shadow "
        "arms are not scored",
    )
    blurb_generator_url: str = Field(
        "",
        description="an OpenAI-compatible text-generation server (vLLM, TGI, Triton's OpenAI "
        "front end) that writes the blurbs, grounded in each item's text; empty: extractive "
        "blurbs only",
    )
    blurb_generator_model: str = Field("", description="the model name the server serves")
    blurb_generator_api_key: SecretStr = Field(
        SecretStr(""), description="sent as a bearer token when set"
    )
    blurb_generator_timeout_s: float = Field(
        2.0, gt=0, le=30, description="per item; the extractive blurb stands when it passes"
    )
    max_track_events: int = Field(1000, ge=1)
    catalog_api_keys: list[SecretStr] = Field(
        default_factory=list,
        description="keys that may call CatalogService/UpdateItems (x-api-key, or "
        "authorization: Bearer KEY), as a JSON list; a storefront key is not one. Empty: "
        "UpdateItems is refused (FAILED_PRECONDITION). Needs catalog_updates",
    )
    max_catalog_updates: int = Field(1000, ge=1, le=100_000, description="per UpdateItems call")
    track_max_in_flight: int = Field(
        10_000,
        ge=1000,
        description="events reserved for logging but not yet durable; beyond it Track answers "
        "RESOURCE_EXHAUSTED with a retry delay",
    )
    state: Literal["embedded", "redis"] = "embedded"
    redis_url: str = Field(
        "redis://127.0.0.1:6379/0",
        description="the shared state store: redis://host:port/db (one server) or "
        "redis+cluster://host:port[,host:port...] (a Redis Cluster, found from those seeds; "
        "rediss+cluster:// with TLS)",
    )
    event_log: Literal["file", "redis"] = Field(
        "file",
        description="file: the group-commit log in event_log_dir, this process's own; redis: "
        "Redis Streams at redis_url, shared by every gateway (needs state=redis)",
    )
    event_log_dir: Path = Field(default_factory=lambda: var("events"))
    stream_partitions: int = Field(
        16,
        ge=1,
        le=4096,
        description="event_log=redis: streams the log is split into by user id (one cluster "
        "slot each; a user's events stay in order in one). Keep it across restarts",
    )
    stream_retention_s: float = Field(
        24 * 3600.0,
        gt=0,
        description="event_log=redis: entries older than this are trimmed (XADD MINID ~)",
    )
    redis_wait_replicas: int = Field(
        0,
        ge=0,
        le=16,
        description="event_log=redis: Track acknowledges once this many replicas hold the "
        "events (WAIT); 0: the master's AOF alone",
    )
    redis_wait_timeout_ms: int = Field(
        100,
        ge=1,
        le=10_000,
        description="event_log=redis: how long WAIT may block; short of the replicas after "
        "it, Track answers UNAVAILABLE",
    )
    local_workers: int = _cpu_bound_workers()
    """The handler threads with ``stages=local`` (``workers`` applies with ``grpc``, where the
    gateway mostly waits on the stages)."""
    api_keys: list[SecretStr] = Field(
        default_factory=list,
        description="storefront API keys (JSON list); with keys or a JWKS every Search, "
        "Recommend and Track needs credentials",
    )
    jwt_jwks_file: Path | None = Field(None, description="JWKS that verifies JWT bearers")
    jwt_issuer: str | None = None
    jwt_audience: str | None = None
    rate_limit_qps: float = Field(
        200.0, ge=0, description="requests a second per client (API key or JWT subject); 0: off"
    )
    rate_limit_burst: float = Field(400.0, ge=1)
    stage_tls_ca_file: Path | None = Field(
        None, description="call the stage services over TLS, verifying them with this CA"
    )
    stage_tls_cert_file: Path | None = Field(
        None, description="the gateway's client certificate for the stages (mTLS)"
    )
    stage_tls_key_file: Path | None = None
    stages: Literal["grpc", "local"] = Field(
        "grpc",
        description="grpc: call the recall, coarse, fine and rerank services; local: run their "
        "stage logic in this process (a one-machine deployment), read their SLUICE_<STAGE>_* "
        "settings, and call Triton for the fine ranker directly",
    )

    def server_workers(self) -> int:
        return self.local_workers if self.stages == "local" else self.workers

    def guard(self) -> Guard | None:
        auth = self.storefront_auth()
        base = super().guard()
        if auth is None:
            return base
        rate = (
            RateLimits(self.rate_limit_qps, self.rate_limit_burst) if self.rate_limit_qps else None
        )
        return Guard(
            peers=base.peers if base else None,
            storefront=auth,
            rate_limits=rate,
            own_credentials=frozenset({"sluice.v1.CatalogService"}),
        )

    def storefront_auth(self) -> StorefrontAuth | None:
        """None when no keys and no JWKS are configured (development only)."""
        if not self.api_keys and self.jwt_jwks_file is None:
            return None
        return StorefrontAuth.from_files(
            [k.get_secret_value() for k in self.api_keys],
            self.jwt_jwks_file,
            self.jwt_issuer,
            self.jwt_audience,
        )

    @field_validator("recall_addr", "coarse_addr", "fine_addr", "rerank_addr")
    @classmethod
    def _stage_target(cls, value: str) -> str:
        parse_target(value)  # ValueError names what is wrong
        return value

    @model_validator(mode="after")
    def _budgets(self) -> GatewaySettings:
        if self.coarse_candidates > self.recall_candidates:
            raise ValueError("coarse_candidates must not exceed recall_candidates")
        if self.event_log == "redis" and self.state != "redis":
            raise ValueError("event_log=redis needs state=redis (the gateways share their state)")
        if self.profile == "production" and not (self.api_keys or self.jwt_jwks_file):
            raise ValueError("the production profile needs api_keys or jwt_jwks_file")
        return self
