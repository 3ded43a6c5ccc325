"""Bring your own ranker: the fine stage serves any model that declares the ranker contract.

A small MLP, written here and independent of the build's transformer, is exported to ONNX
and placed in a model repository beside the build's ``fine_ranker``, with its own configs
(the stock onnxruntime one, and configs/local.pbtxt for this machine's python-backend
Triton, running the same generic model.py the build ships). A real Triton serves both; a
real fine stage, told ``SLUICE_FINE_MODEL_NAME=mlp_ranker``, ranks with the MLP. A model
that breaks the contract keeps the stage from becoming ready, and says why.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from torch import Tensor, nn

from sluice.artifacts import MANIFEST, Artifacts
from sluice.coarse.engine import FeatureTables
from sluice.convert import candidates_to_proto, context_to_proto
from sluice.domain import Budget, Candidates, FineOverrides, RankContext
from sluice.fine import contract
from sluice.fine.backend import TorchBackend
from sluice.fine.engine import FineEngine
from sluice.fine.fusion import FusionWeights, fuse
from sluice.fine.v2 import fine_pb2, fine_pb2_grpc
from sluice.launch import Cluster, Ports

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
RUNNER = ROOT / "model_repository" / "fine_ranker" / "model.py"
MLP_VERSION = "7"  # not the build's version: the stage must report the MLP's own


class MlpRanker(nn.Module):
    """Score = MLP([candidate vector, mean history vector, projected query])."""

    def __init__(self, num_items: int, dim: int = 16, hidden: int = 32) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(11)
        self.items = nn.Parameter(torch.randn(num_items + 1, dim, generator=g))
        self.query = nn.Linear(contract.INPUTS[2].dims[0], dim)
        self.hidden = nn.Linear(3 * dim, hidden)
        self.out = nn.Linear(hidden, 1)

    def forward(
        self, history: Tensor, candidates: Tensor, query_emb: Tensor, has_query: Tensor
    ) -> Tensor:
        valid = (history > 0).to(torch.float32).unsqueeze(-1)
        user = (self.items[history] * valid).sum(1) / valid.sum(1).clamp(min=1.0)
        query = self.query(query_emb) * has_query.to(torch.float32)
        cand = self.items[candidates]
        x = torch.cat(
            [cand, user.unsqueeze(1).expand_as(cand), query.unsqueeze(1).expand_as(cand)], -1
        )
        return self.out(torch.relu(self.hidden(x))).squeeze(-1)

    def numpy_scores(self, history: np.ndarray, candidates: np.ndarray) -> np.ndarray:
        """The same function in numpy, for rows without a query."""
        p = {k: v.detach().numpy().astype(np.float64) for k, v in self.named_parameters()}
        valid = (history > 0)[..., None]
        user = (p["items"][history] * valid).sum(1) / np.maximum(valid.sum(1), 1)
        query = np.zeros_like(user)  # has_query False
        cand = p["items"][candidates]
        rep = np.broadcast_to
        x = np.concatenate(
            [cand, rep(user[:, None], cand.shape), rep(query[:, None], cand.shape)], -1
        )
        h = np.maximum(x @ p["hidden.weight"].T + p["hidden.bias"], 0.0)
        return (h @ p["out.weight"].T + p["out.bias"])[..., 0]


def config(name: str, backend: str, output: str = "SCORES") -> str:
    """A model config declaring the contract (with another output name when asked)."""
    inputs = ",\n".join(
        f'  {{ name: "{t.name}" data_type: TYPE_{t.datatype} dims: [ {t.dims[0]} ] }}'
        for t in contract.INPUTS
    )
    return (
        f'name: "{name}"\nbackend: "{backend}"\nmax_batch_size: 16\n'
        f"input [\n{inputs}\n]\n"
        f'output [ {{ name: "{output}" data_type: TYPE_FP32 dims: [ 256 ] }} ]\n'
        "dynamic_batching { }\n"
        "instance_group [ { kind: KIND_CPU count: 1 } ]\n"
    )


def ship(model: nn.Module, repo: Path, name: str, version: str, output: str = "SCORES") -> None:
    """What an ML engineer does: export ONNX, add the configs and (for the local Triton)
    the generic python-backend runner."""
    folder = repo / name
    (folder / version).mkdir(parents=True)
    (folder / "configs").mkdir()
    example = tuple(
        torch.from_numpy(np.zeros((2, *t.dims), dtype=t.numpy_dtype)) for t in contract.INPUTS
    )
    torch.onnx.export(
        model.eval(),
        example,
        str(folder / version / "model.onnx"),
        input_names=[t.name for t in contract.INPUTS],
        output_names=[output],
        dynamic_shapes=tuple({0: torch.export.Dim("batch")} for _ in contract.INPUTS),
        dynamo=True,
        verbose=False,
    )
    (folder / "config.pbtxt").write_text(config(name, "onnxruntime", output))
    (folder / "configs" / "local.pbtxt").write_text(config(name, "python", output))
    shutil.copy(RUNNER, folder / version / "model.py")


@pytest.fixture(scope="module")
def mlp(tiny_artifacts: Artifacts) -> MlpRanker:
    return MlpRanker(len(tiny_artifacts.catalog)).eval()


@pytest.fixture(scope="module")
def byo_artifacts(
    tiny_artifacts: Artifacts, mlp: MlpRanker, tmp_path_factory: pytest.TempPathFactory
) -> Artifacts:
    """The tiny build, served from a repository that also holds two brought models."""
    root = tmp_path_factory.mktemp("byo")
    repo = root / "model_repository"
    shutil.copytree(
        tiny_artifacts.model_repository / contract.BUILD_MODEL,
        repo / contract.BUILD_MODEL,
        copy_function=os.symlink,
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    ship(mlp, repo, "mlp_ranker", MLP_VERSION)
    ship(mlp, repo, "bad_ranker", "1", output="LOGITS")  # breaks the contract
    out = root / "artifacts"
    out.mkdir()
    for entry in tiny_artifacts.root.iterdir():
        if entry.name != MANIFEST:
            (out / entry.name).symlink_to(entry)
    manifest = json.loads((tiny_artifacts.root / MANIFEST).read_text())
    manifest["fine_ranker"]["repository"] = str(repo)
    (out / MANIFEST).write_text(json.dumps(manifest))
    return Artifacts(out)


@pytest.fixture(scope="module")
def byo_cluster(
    byo_artifacts: Artifacts, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    """Triton over the repository, and a fine stage calling mlp_ranker."""
    base = tmp_path_factory.mktemp("byo-cluster")
    cluster = Cluster(
        artifacts=byo_artifacts.root,
        ports=Ports.random(),
        log_dir=base / "logs",
        event_log_dir=base / "events",
        # the build's transformer stays reachable for an experiment arm that asks for it
        extra_env={
            "SLUICE_FINE_MODEL_NAME": "mlp_ranker",
            "SLUICE_FINE_ARM_MODELS": json.dumps([contract.BUILD_MODEL]),
        },
    )
    try:
        cluster.start_process("triton")
        cluster.wait_serving("triton", timeout_s=240)
        cluster.start_process("fine")
        cluster.wait_serving("fine", timeout_s=240)
        yield cluster
    finally:
        cluster.stop()


def test_the_stage_ranks_with_the_brought_model(
    byo_cluster: Cluster, byo_artifacts: Artifacts, mlp: MlpRanker
) -> None:
    catalog = byo_artifacts.catalog
    _, histories = byo_artifacts.users()
    history = max(histories, key=len)
    rng = np.random.default_rng(5)
    items = rng.choice(catalog.item_ids, size=60, replace=False)
    ctx = RankContext(history_item_ids=history)
    cands = Candidates(items, np.zeros(len(items)), np.zeros(len(items)))
    request = fine_pb2.RankCandidatesRequest(
        context=context_to_proto(ctx),
        candidates=candidates_to_proto(cands),
        max_candidates=len(items),
    )
    with byo_cluster.channel("fine") as channel:
        resp = fine_pb2_grpc.FineRankServiceStub(channel).RankCandidates(request, timeout=30)

    # what the MLP dictates, computed here in numpy from its weights, fused as the stage does
    # (by beta: the build's signal weights were fitted beside another model; equal incoming
    # scores: the order is the MLP's alone)
    default = FineEngine(catalog, TorchBackend(byo_artifacts.ranker_dir))
    history_t, cand_t, _, _ = default.tensors(ctx, cands)
    mlp_scores = mlp.numpy_scores(history_t, cand_t).reshape(-1)[: len(items)]
    fusion = FusionWeights.load(byo_artifacts.root / "fusion.json")
    expected = fuse(mlp_scores, cands.scores, fusion.beta(False))
    order = np.argsort(-expected, kind="stable")

    assert resp.model_version == MLP_VERSION
    assert list(resp.candidates.item_ids) == items[order].tolist()
    np.testing.assert_allclose(resp.candidates.scores, expected[order], rtol=1e-4, atol=1e-4)
    # ... which is not what the build's transformer would have answered
    transformer = FineEngine(catalog, default.backend, fusion).rank(ctx, cands, Budget(len(items)))
    assert transformer.item_ids.tolist() != list(resp.candidates.item_ids)


def test_an_experiment_arm_ranks_with_its_own_model(
    byo_cluster: Cluster, byo_artifacts: Artifacts
) -> None:
    """RankContext.fine.model (an arm's ranker_model) picks one of the stage's arm models per
    request: the build's transformer here, beside the MLP the stage serves by default."""
    catalog = byo_artifacts.catalog
    _, histories = byo_artifacts.users()
    history = max(histories, key=len)
    items = np.random.default_rng(6).choice(catalog.item_ids, size=60, replace=False)
    cands = Candidates(items, np.zeros(len(items)), np.zeros(len(items)))

    def rank(model: str) -> fine_pb2.RankCandidatesResponse:
        ctx = RankContext(history_item_ids=history, fine=FineOverrides(model=model or None))
        request = fine_pb2.RankCandidatesRequest(
            context=context_to_proto(ctx),
            candidates=candidates_to_proto(cands),
            max_candidates=len(items),
        )
        with byo_cluster.channel("fine") as channel:
            stub = fine_pb2_grpc.FineRankServiceStub(channel)
            response: fine_pb2.RankCandidatesResponse = stub.RankCandidates(request, timeout=30)
            return response

    default, arm = rank(""), rank(contract.BUILD_MODEL)
    assert default.model_version == MLP_VERSION
    assert arm.model_version == byo_artifacts.ranker_version
    # the arm's model is the one the build's signal weights were fitted beside: they apply
    fusion = FusionWeights.load(byo_artifacts.root / "fusion.json")
    assert fusion.signals_model == f"{contract.BUILD_MODEL}:{byo_artifacts.ranker_version}"
    transformer = FineEngine(
        catalog,
        TorchBackend(byo_artifacts.ranker_dir),
        fusion,
        tables=FeatureTables.from_artifacts(byo_artifacts, lexical=False),
    ).rank(RankContext(history_item_ids=history), cands, Budget(len(items)))
    assert list(arm.candidates.item_ids)[:10] == transformer.item_ids.tolist()[:10]
    assert list(default.candidates.item_ids) != list(arm.candidates.item_ids)
    with pytest.raises(grpc.RpcError) as err:
        rank("nope_ranker:3")
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "context.fine.model" in str(err.value.trailing_metadata())


def test_a_model_off_the_contract_keeps_the_stage_down(
    byo_cluster: Cluster, byo_artifacts: Artifacts, tmp_path: Path
) -> None:
    ports = Ports.random()
    ports.triton_grpc, ports.triton_http = (
        byo_cluster.ports.triton_grpc,
        byo_cluster.ports.triton_http,
    )
    bad = Cluster(
        artifacts=byo_artifacts.root,
        ports=ports,
        log_dir=tmp_path / "logs",
        event_log_dir=tmp_path / "events",
        extra_env={"SLUICE_FINE_MODEL_NAME": "bad_ranker", "SLUICE_FINE_TRITON_WAIT_S": "60"},
    )
    try:
        bad.start_process("fine")
        code = bad.processes["fine"].wait(timeout=240)
    finally:
        bad.stop()
    assert code != 0, "the fine stage served a model that breaks the contract"
    log = (tmp_path / "logs" / "fine.log").read_text()
    assert "does not declare the ranker contract" in log
    assert "output SCORES is missing" in log
    assert "bad_ranker" in log
