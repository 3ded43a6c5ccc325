"""``sluice serve <service>``: run one service process on the shared bootstrap."""

from __future__ import annotations

from threadpoolctl import threadpool_limits

from sluice.config import GatewaySettings, ServiceSettings
from sluice.core import logging as slog
from sluice.core.server import ServiceSpec, serve_forever
from sluice.wiring import BY_NAME, stage_spec


def service_spec(name: str) -> tuple[ServiceSettings, ServiceSpec]:
    """The service ``name`` with its settings read from the environment."""
    if name == "gateway":
        from sluice.gateway import service as gateway

        settings = GatewaySettings()
        return settings, gateway.spec(settings)
    entry = BY_NAME[name]
    stage_settings = entry.settings()
    return stage_settings, stage_spec(entry, stage_settings)


def serve(name: str) -> None:
    settings, spec = service_spec(name)
    slog.configure(name, settings.log_level)
    # BLAS (numpy) and OpenMP (FAISS) pools; torch, where a stage loads it, takes torch_threads
    threadpool_limits(limits=settings.blas_threads)
    serve_forever(spec, settings.server_options())
