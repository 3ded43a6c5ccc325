"""Service settings: defaults, environment overrides and validation."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from sluice.config import (
    CoarseSettings,
    FineSettings,
    GatewaySettings,
    RecallSettings,
    RerankSettings,
)


def test_cpu_bound_services_run_few_handler_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    for cls in (RecallSettings, CoarseSettings, RerankSettings):
        assert cls().server_workers() == 4
    assert FineSettings().server_workers() == 16  # waits on Triton
    assert GatewaySettings().server_workers() == 16  # waits on the stages
    assert GatewaySettings(stages="local").server_workers() == 4  # runs them itself
    monkeypatch.setenv("SLUICE_RECALL_WORKERS", "7")
    monkeypatch.setenv("SLUICE_GATEWAY_STAGES", "local")
    monkeypatch.setenv("SLUICE_GATEWAY_LOCAL_WORKERS", "2")
    assert RecallSettings().server_workers() == 7
    assert GatewaySettings().server_workers() == 2


def test_bad_settings_are_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLUICE_GATEWAY_STAGES", "sideways")
    with pytest.raises(ValidationError):
        GatewaySettings()
    with pytest.raises(ValidationError):
        RecallSettings(workers=0)
    with pytest.raises(ValidationError):
        GatewaySettings(stages="grpc", recall_candidates=100, coarse_candidates=200)
