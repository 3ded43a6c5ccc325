"""``sluice serve <service>``: run one service process on the shared bootstrap."""

from __future__ import annotations

from collections.abc import Callable

from pydantic_settings import BaseSettings

from sluice.config import (
    CoarseSettings,
    FineSettings,
    GatewaySettings,
    RecallSettings,
    RerankSettings,
    ServiceSettings,
)
from sluice.core import logging as slog
from sluice.core.server import ServiceSpec, serve_forever


def _factories() -> dict[str, tuple[type[ServiceSettings], Callable[..., ServiceSpec]]]:
    from sluice.coarse import service as coarse
    from sluice.fine import service as fine
    from sluice.gateway import service as gateway
    from sluice.recall import service as recall
    from sluice.rerank import service as rerank

    return {
        "recall": (RecallSettings, recall.spec),
        "coarse": (CoarseSettings, coarse.spec),
        "fine": (FineSettings, fine.spec),
        "rerank": (RerankSettings, rerank.spec),
        "gateway": (GatewaySettings, gateway.spec),
    }


SERVICES = ("recall", "coarse", "fine", "rerank", "gateway")


def serve(name: str) -> None:
    settings_cls, make_spec = _factories()[name]
    settings: BaseSettings = settings_cls()
    assert isinstance(settings, ServiceSettings)
    slog.configure(name, settings.log_level)
    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(settings.torch_threads)
    threadpool_limits(limits=settings.blas_threads, user_api="blas")
    serve_forever(
        make_spec(settings),
        settings.host,
        settings.port,
        settings.metrics_port,
        settings.server_workers(),
    )
