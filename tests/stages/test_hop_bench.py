"""``python -m sluice.bench.hotpath hop``: the figures it reports compare one stage in
process with the same calls over gRPC to ``sluice serve``, so both must compute the same
answers; a served stage that drifted from its in-process engine would make them meaningless."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sluice.artifacts import Artifacts
from sluice.bench.hotpath import main


@pytest.mark.parametrize("stage", ["recall", "fine", "rerank"])
def test_a_stage_answers_the_same_in_process_and_served(
    tmp_path: Path, tiny_artifacts: Artifacts, stage: str
) -> None:
    """Recall (no candidates in), fine (the served process gets the in-process torch ranker)
    and re-ranking (paged): every captured call gets the same ids, scores and total size
    both ways, and each served call wakes the server."""
    out = tmp_path / "hop.json"
    args = ["hop", str(tiny_artifacts.root), "--stage", stage, "--requests", "12"]
    assert main([*args, "--rounds", "1", "--json", str(out)]) == 0
    figures = json.loads(out.read_text())
    assert figures["stage"] == stage
    assert figures["calls"] >= 12  # a Search and a Recommend each call every stage once
    assert figures["identical_answers"] == figures["calls"]
    assert figures["grpc_server_switches"] >= 1
    assert figures["grpc_wall_ms"] > 0 and figures["health_wall_ms"] > 0
