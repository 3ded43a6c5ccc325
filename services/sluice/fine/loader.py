"""Loads the fine engine as every layout runs it: its model backend chosen by settings."""

from __future__ import annotations

from collections.abc import Callable

from sluice.artifacts import Artifacts
from sluice.config import FineSettings
from sluice.data.updates import follow_updates, serving_artifacts
from sluice.domain import Budget, Candidates, RankContext
from sluice.fine.backend import OnnxBackend, RankerBackend, TorchBackend, TritonBackend
from sluice.fine.contract import BUILD_MODEL
from sluice.fine.engine import FineEngine
from sluice.fine.fusion import FusionWeights


def make_backend(
    settings: FineSettings, artifacts: Artifacts, model: str | None = None
) -> RankerBackend:
    """The stage's ranker; ``model`` ("name[:version]", an arm model): that one on Triton."""
    if settings.backend != "triton":
        if model is not None:
            raise ValueError("arm models need the triton backend")
        if settings.backend == "onnx":
            return OnnxBackend(artifacts.ranker_dir, threads=settings.torch_threads)
        return TorchBackend(artifacts.ranker_dir, threads=settings.torch_threads)
    tls = (
        (settings.triton_tls_ca_file, settings.triton_tls_cert_file, settings.triton_tls_key_file)
        if settings.triton_tls_ca_file
        else None
    )
    if model is None:
        name, version = settings.model_name, settings.model_version
    else:
        name, _, given = model.partition(":")
        version = given or None
    if version is None:  # a model brought alongside the build's has versions of its own
        version = artifacts.ranker_version if name == BUILD_MODEL else ""
    return TritonBackend(settings.triton_url, name, version, tls)


def load(settings: FineSettings, closers: list[Callable[[], None]]) -> FineEngine:
    """The engine, warmed up: waits for Triton to serve the model (Triton and the services
    start side by side), then runs a few requests (Triton's first executions are slow)."""
    artifacts = serving_artifacts(settings.artifacts, settings)
    fusion = FusionWeights.load(artifacts.root / "fusion.json")
    backend = make_backend(settings, artifacts)
    arms = {model: make_backend(settings, artifacts, model) for model in settings.arm_models}
    for b in (backend, *arms.values()):
        if isinstance(b, TritonBackend):
            closers.append(b.close)
            b.wait_ready(settings.triton_wait_s)
    tables = None
    if fusion.signals:  # the signals read coarse features: their tables, without BM25
        from sluice.coarse.engine import FeatureTables

        tables = FeatureTables.from_artifacts(artifacts, lexical=False)
    engine = FineEngine(artifacts.catalog, backend, fusion, arms, tables)
    follow_updates(settings, artifacts, closers, text_vectors=tables is not None)
    ids = artifacts.catalog.item_ids[:20]
    ctx, cands = RankContext(history_item_ids=ids[:5]), Candidates(ids, ids * 0.0, ids * 0)
    for _ in range(3):
        engine.rank(ctx, cands, Budget(10))
        if not engine.runs_model(ctx):  # the build's fusion does not read it: an arm's may
            engine.model_scores(ctx, cands)
    return engine
