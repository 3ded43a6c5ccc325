"""``python -m sluice.bench.hotpath hop`` and ``served``: the figures they report compare
the same work in process and over gRPC, so both sides must compute the same answers; a served
stage or gateway that drifted from the in-process engines would make them meaningless."""

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


def test_the_served_one_machine_answers_what_the_cascade_does_in_process(
    tmp_path: Path, tiny_artifacts: Artifacts
) -> None:
    """``hotpath served`` compares the in-process cascade with a served one-machine gateway
    on the same torch ranker: both must give the same pages, and the served side's CPU must
    be the gateway process's, which each request wakes."""
    out = tmp_path / "served.json"
    args = ["served", str(tiny_artifacts.root), "--requests", "12", "--rounds", "1"]
    assert main([*args, "--json", str(out)]) == 0
    figures = json.loads(out.read_text())
    assert figures["requests"] == 12
    assert figures["identical_pages"] == 12
    assert figures["served_server_cpu_ms"] > 0
    assert figures["served_server_switches"] >= 1
    assert figures["in_process_client_cpu_ms"] > 0 and figures["served_wall_ms"] > 0


def test_the_stage_replay_counts_every_call_the_cascade_made(
    tmp_path: Path, tiny_artifacts: Artifacts
) -> None:
    """``hotpath stage``: the coarse stage's calls for 12 requests (a Search and a Recommend
    each call it once), replayed over three rounds; the best round is no worse than the
    median."""
    out = tmp_path / "stage.json"
    args = ["stage", str(tiny_artifacts.root), "--stage", "coarse", "--requests", "12"]
    assert main([*args, "--rounds", "3", "--json", str(out)]) == 0
    figures = json.loads(out.read_text())
    assert figures["stage"] == "coarse" and figures["calls"] == 12
    assert 0 < figures["best_cpu_ms"] <= figures["median_cpu_ms"]
