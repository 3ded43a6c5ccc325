"""grpcio's experiments are set before grpcio loads, in every process the ``sluice`` command
starts (sluice.grpc_env): grpcio reads ``GRPC_EXPERIMENTS`` once, at import, so a setting
made after any module imported grpc would silently do nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from sluice import grpc_env

# In a fresh interpreter: record GRPC_EXPERIMENTS at the moment grpc is first imported, then
# import the sluice command's module as `sluice serve` / `sluice up` do.
_PROBE = """
import importlib.abc, json, os, sys
seen = {}
class Watch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "grpc" and "grpc" not in seen:
            seen["grpc"] = os.environ.get("GRPC_EXPERIMENTS")
        return None
sys.meta_path.insert(0, Watch())
import sluice.cli
import grpc
print(json.dumps({"at_grpc_import": seen.get("grpc", "not imported"),
                  "imported_by_cli": "grpc" in seen}))
"""


def _probe(env_value: str | None) -> dict[str, object]:
    env = {k: v for k, v in os.environ.items() if k != "GRPC_EXPERIMENTS"}
    if env_value is not None:
        env["GRPC_EXPERIMENTS"] = env_value
    out = subprocess.run(
        [sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_the_sluice_command_sets_the_experiments_before_grpc_loads() -> None:
    seen = _probe(None)
    assert seen["imported_by_cli"] is True  # the command's own imports load grpc
    assert seen["at_grpc_import"] == grpc_env.GRPC_EXPERIMENTS


@pytest.mark.parametrize("operator", ["", "-event_engine_dns"])
def test_an_operators_own_setting_wins(operator: str) -> None:
    assert _probe(operator)["at_grpc_import"] == operator


def test_apply_sets_only_a_missing_variable() -> None:
    environ: dict[str, str] = {}
    grpc_env.apply(environ)
    assert environ == {"GRPC_EXPERIMENTS": grpc_env.GRPC_EXPERIMENTS}
    mine = {"GRPC_EXPERIMENTS": "-event_engine_dns"}
    grpc_env.apply(mine)
    assert mine == {"GRPC_EXPERIMENTS": "-event_engine_dns"}
