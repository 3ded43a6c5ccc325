"""Typed, validated settings: one class per service, read from ``SLUICE_<SERVICE>_*``.

Every service process reads its settings here and nowhere else, e.g.
``SLUICE_RECALL_PORT=50061`` or ``SLUICE_GATEWAY_DEADLINE_MS=150``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from sluice.core.admission import AdmissionConfig
from sluice.core.server import ServerOptions

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_ARTIFACTS = ROOT / "artifacts" / "default"


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

    artifacts: Path = DEFAULT_ARTIFACTS
    host: str = "127.0.0.1"
    port: int = Field(0, ge=0, le=65535)
    metrics_port: int = Field(0, ge=0, le=65535, description="Prometheus /metrics; 0 disables")
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

    def admission_config(self) -> AdmissionConfig | None:
        if not self.admission:
            return None
        return AdmissionConfig(
            target_ms=self.admission_target_ms,
            initial=min(self.server_workers(), self.admission_max),
            max_limit=self.admission_max,
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
    redis_url: str = "redis://127.0.0.1:6379/0"
    live_popularity_refresh_s: float = Field(
        1.0, gt=0.0, le=60.0, description="how often live popularity is read from the store"
    )
    live_popularity_weight: float = Field(
        0.7, ge=0.0, le=1.0, description="most weight live popularity gets over build-time counts"
    )


class CoarseSettings(StageSettings):
    model_config = SettingsConfigDict(env_prefix="SLUICE_COARSE_")
    port: int = 50062
    workers: int = _cpu_bound_workers()


class FineSettings(StageSettings):
    model_config = SettingsConfigDict(env_prefix="SLUICE_FINE_")
    port: int = 50063
    backend: Literal["triton", "torch"] = "triton"
    triton_url: str = "127.0.0.1:8001"
    model_name: str = "fine_ranker"
    triton_wait_s: float = Field(
        300.0, gt=0, description="how long warm-up waits for Triton to load the model"
    )
    max_candidates: int = Field(1024, ge=1)


class RerankSettings(StageSettings):
    model_config = SettingsConfigDict(env_prefix="SLUICE_RERANK_")
    port: int = 50064
    workers: int = _cpu_bound_workers()
    diversity_lambda: float = Field(0.85, ge=0.0, le=1.0)
    max_per_brand: int = Field(4, ge=0)


class GatewaySettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="SLUICE_GATEWAY_")
    port: int = 50051
    admission_target_ms: float = Field(
        100.0,
        gt=0,
        description="average latency of admitted requests the limit steers to: well inside "
        "the default 250 ms budget, so that admitted requests keep their p99",
    )
    max_request_bytes: int = Field(
        1 << 20,
        ge=1024,
        description="a storefront request needs a few KiB; Track's 1000 events fit in 1 MiB",
    )
    recall_addr: str = "127.0.0.1:50061"
    coarse_addr: str = "127.0.0.1:50062"
    fine_addr: str = "127.0.0.1:50063"
    rerank_addr: str = "127.0.0.1:50064"
    deadline_ms: int = Field(250, ge=1, description="used when the caller sets no deadline")
    min_deadline_ms: int = Field(5, ge=1, description="below this nothing is attempted")
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
    max_track_events: int = Field(1000, ge=1)
    track_max_in_flight: int = Field(
        10_000,
        ge=1000,
        description="events reserved for logging but not yet durable; beyond it Track answers "
        "RESOURCE_EXHAUSTED with a retry delay",
    )
    state: Literal["embedded", "redis"] = "embedded"
    redis_url: str = "redis://127.0.0.1:6379/0"
    event_log_dir: Path = ROOT / "var" / "events"
    local_workers: int = _cpu_bound_workers()
    """The handler threads with ``stages=local`` (``workers`` applies with ``grpc``, where the
    gateway mostly waits on the stages)."""
    stages: Literal["grpc", "local"] = Field(
        "grpc",
        description="grpc: call the recall, coarse, fine and rerank services; local: run their "
        "stage logic in this process (a one-machine deployment), read their SLUICE_<STAGE>_* "
        "settings, and call Triton for the fine ranker directly",
    )

    def server_workers(self) -> int:
        return self.local_workers if self.stages == "local" else self.workers

    @model_validator(mode="after")
    def _budgets(self) -> GatewaySettings:
        if self.coarse_candidates > self.recall_candidates:
            raise ValueError("coarse_candidates must not exceed recall_candidates")
        return self
