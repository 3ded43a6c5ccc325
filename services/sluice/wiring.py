"""The one wiring of the cascade: which stages there are, and how each is loaded.

Every stage is a folder (``sluice/<name>/``) with ``engine.py`` (pure), ``loader.py``
(``load(settings, closers)``: the warmed-up engine) and ``service.py`` (its
:class:`~sluice.core.stage.StageBinding`). This registry is how every process loads a
stage: the stage services (:func:`stage_spec`), the one-machine gateway, evaluation and
the benchmarks (:func:`load_engines`). (The launcher still names the processes it starts,
with their ports: ``sluice.launch``.) Modules are imported
when a stage is used, so a process imports only the stages it serves.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sluice.builds import BuildWatcher, LoadedBuilds, first_build, health_name, is_store
from sluice.config import (
    CoarseSettings,
    FineSettings,
    RecallSettings,
    RerankSettings,
    ServiceSettings,
    StageSettings,
)
from sluice.core.server import ServiceSpec
from sluice.core.stage import StageBinding, StageLimits, StageServicer
from sluice.domain import StageName


@dataclass(frozen=True)
class StageEntry:
    """One stage folder."""

    name: str
    stage: StageName
    settings: type[StageSettings]

    def binding(self, settings: StageSettings | None = None) -> StageBinding:
        """The stage's gRPC service (as ``settings`` have it serve, if the stage has variants:
        a recall shard serves another service than the whole catalog's)."""
        module = importlib.import_module(f"sluice.{self.name}.service")
        if settings is not None and hasattr(module, "binding"):
            return module.binding(settings)
        binding: StageBinding = module.BINDING
        return binding

    def limits(self, settings: StageSettings) -> StageLimits:
        """What the stage's service accepts."""
        module = importlib.import_module(f"sluice.{self.name}.service")
        if hasattr(module, "limits"):
            return module.limits(settings)
        return StageLimits(settings.max_candidates, settings.deadline_ms / 1000)

    def load(self, settings: StageSettings, closers: list[Callable[[], None]]) -> Any:
        """The stage's engine, loaded and warmed up as its service runs it."""
        return importlib.import_module(f"sluice.{self.name}.loader").load(settings, closers)


# In cascade order.
STAGES: tuple[StageEntry, ...] = (
    StageEntry("recall", StageName.RECALL, RecallSettings),
    StageEntry("coarse", StageName.COARSE_RANK, CoarseSettings),
    StageEntry("fine", StageName.FINE_RANK, FineSettings),
    StageEntry("rerank", StageName.RERANK, RerankSettings),
)
BY_NAME: Mapping[str, StageEntry] = {e.name: e for e in STAGES}
# Everything ``sluice serve`` runs: the stages, then the gateway in front of them.
SERVICES: tuple[str, ...] = (*BY_NAME, "gateway")


def stage_spec(entry: StageEntry, settings: StageSettings) -> ServiceSpec:
    """A stage's service process: the generic servicer around the engines of its builds
    (one, or while a newly published build swaps in, two: see :mod:`sluice.builds`)."""
    builds: LoadedBuilds[Any] = LoadedBuilds(
        lambda build, closers: entry.load(
            settings.model_copy(update={"artifacts": build}), closers
        ),
        retain_s=settings.build_retain_s,
    )
    servicer = StageServicer(entry.binding(settings), entry.limits(settings), builds)
    return ServiceSpec(entry.name, servicer.add_to, **serve_builds(builds, settings))


def serve_builds(builds: LoadedBuilds[Any], settings: ServiceSettings) -> dict[str, Any]:
    """The warm-up, shutdown and health hooks of a service that serves ``builds``: the
    build ``settings.artifacts`` names, and each build published to its store later."""
    watcher: list[BuildWatcher[Any]] = []

    def attach_health(set_health: Callable[[str, bool], None]) -> None:
        builds.on_change = lambda build_id, loaded: set_health(health_name(build_id), loaded)

    def warmup() -> None:
        builds.load(first_build(settings.artifacts, settings.build_poll_s))
        if is_store(settings.artifacts):
            watcher.append(BuildWatcher(settings.artifacts, builds, settings.build_poll_s).start())

    def shutdown() -> None:
        for w in watcher:
            w.stop()
        builds.close()

    return {"warmup": warmup, "shutdown": shutdown, "attach_health": attach_health}


def load_engines(
    artifacts: Path,
    closers: list[Callable[[], None]],
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[StageName, Any]:
    """Every stage's engine in this process, from ``artifacts``.

    Each stage reads its own ``SLUICE_<STAGE>_*`` settings, as its service would;
    ``overrides`` sets fields per stage name (``{"fine": {"backend": "torch"}}``)."""
    overrides = overrides or {}
    engines = {}
    for entry in STAGES:
        fields = {"artifacts": artifacts, **overrides.get(entry.name, {})}
        engines[entry.stage] = entry.load(entry.settings(**fields), closers)
    return engines
