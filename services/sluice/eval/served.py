"""Recommendation quality of the SERVED cascade, next to the offline models.

``python -m sluice.eval recommend --data ../shared/data/amazon-beauty`` (or
``sluice eval recommend ...``).

Protocol: leave-one-out by time. Each user's last interaction is the test
target, the second last the validation target, the rest training. The build
runs with ``--holdout 1``: it never sees the test targets (popularity,
co-occurrence, the ranker, the coarse weights and the fusion weights are all
fitted on train + validation; the ranker trains on train and early-stops on
validation). Metrics are HR@K / NDCG@K, K = 10, 20, 50, with full ranking over
the catalog and the user's history excluded, computed by the same code as the
offline models (:func:`sluice.eval.metrics.evaluate`).

Three measurements on the same users:

* **served** — Triton and the five services run as separate processes
  (:class:`sluice.launch.Cluster`); every test user's ``Recommend``
  (page size 50) goes to the gateway over gRPC from a few client threads and
  the returned ranked list is scored. An item not on the page ranks below 50.
* **per stage** — the gateway's own logic (:class:`sluice.gateway.pipeline.Gateway`,
  with the same user histories and exclusions the gateway service builds)
  runs in this process and calls the four stage *services* over gRPC
  (:class:`sluice.gateway.stages.GrpcStage`) through a recorder that keeps
  every stage's output: the share of test targets still among the candidates
  after recall (@1000), coarse ranking (@200), fine ranking (@10, and @50) and
  on the final page.
* **offline** — the built fine ranker scoring all items in process, and the
  baselines: popularity (train counts, train + validation counts, and the
  leaky all-interactions count that published PopRec numbers use),
  co-occurrence, and SASRec (the same transformer with ids only, trained by
  the same code).

With ``--pages FILE``, also **in process**: every user's ``Recommend`` through
the four stages in this process (the services' wiring, the ranker in process,
no Triton), its pages written to ``FILE``, or, when ``FILE`` exists, compared
with it: how many top 10s and pages are the same, and the per-user HR@10 and
NDCG@10 differences with paired-bootstrap intervals. Run from two checkouts in
turn on the same build, this is the check that a change which claims to keep
quality does (issue 12).

Builds are cached under ``var/eval/<dataset>/`` (artifacts and model
repository) and reused when present; ``--rebuild`` forces a new one.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sluice import paths
from sluice.artifacts import Artifacts
from sluice.core.stage import StageResult
from sluice.domain import Budget, Candidates, RankContext, StageName, Surface
from sluice.eval.metrics import KS, evaluate, leave_one_out

log = logging.getLogger(__name__)

EVAL_ROOT = paths.var("eval")
PAGE_SIZE = 50
STAGE_KS = {"recall": 1000, "coarse": 200, "fine": 10}


# -- builds -------------------------------------------------------------------------
def eval_dir(data: Path, root: Path = EVAL_ROOT) -> Path:
    """``var/eval/<dataset name>``: where a dataset's evaluation build and reports live."""
    return root / data.resolve().name


def ensure_build(
    data: Path,
    *,
    holdout: int,
    rebuild: bool = False,
    root: Path | None = None,
    progress: bool = True,
    **build_kwargs: Any,
) -> Artifacts:
    """The cached build of ``data`` under ``root`` (default ``var/eval/<name>``), built if needed.

    A cached build is reused when its manifest names the same dataset folder (however the
    path was written), text encoder and holdout. ``build_kwargs`` go to
    :class:`sluice.build.pipeline.BuildOptions`.
    """
    from sluice.build.pipeline import BuildOptions, build

    base = root or eval_dir(data)
    out, repository = base / "artifacts", base / "model_repository"
    manifest = out / "manifest.json"
    if manifest.exists() and not rebuild:
        info = json.loads(manifest.read_text())
        # the same folder however it was named (a relative path, from another checkout)
        built_from = Path(str(info.get("dataset", ""))).resolve()
        same = built_from == data.resolve() and int(info.get("holdout", -1)) == holdout
        encoder = build_kwargs.get("encoder", "minilm")  # builds before the choice: minilm
        same = same and info.get("text_encoder", "minilm") == encoder
        if same:
            _warn_if_stale(info)
            return Artifacts(out)
        log.warning("cached build at %s is for another dataset/holdout/encoder: rebuilding", out)
    for path in (out, repository):
        if path.exists():
            shutil.rmtree(path)
    options = BuildOptions(
        out=out,
        data=data,
        model_repository=repository,
        holdout=holdout,
        progress=progress,
        **build_kwargs,
    )
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    artifacts = build(options)
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    cost = {"wall_s": round(time.perf_counter() - t0, 1), "cpu_s": round(cpu, 1)}
    (out / "build-cost.json").write_text(json.dumps(cost))
    print(f"build: {cost['wall_s']:.0f} s wall, {cost['cpu_s']:.0f} CPU-seconds", flush=True)
    return artifacts


def _warn_if_stale(manifest: dict[str, Any]) -> None:
    from sluice.fine.model import RankerConfig

    built = manifest.get("fine_ranker", {}).get("config")
    current = {k: v for k, v in asdict(RankerConfig()).items() if k != "num_threads"}
    if built is not None and any(built.get(k) != v for k, v in current.items()):
        changed = {k: (built.get(k), v) for k, v in current.items() if built.get(k) != v}
        print(
            f"note: the cached build used other RankerConfig values (built, now): {changed}; "
            "pass --rebuild to retrain with the current defaults",
            flush=True,
        )


# -- the split -------------------------------------------------------------------------
@dataclass
class RecommendSplit:
    """Leave-one-out split with user ids; item ids of the catalog are rows here."""

    artifacts: Artifacts
    user_ids: list[str]
    train: list[np.ndarray]
    valid: np.ndarray
    test: np.ndarray
    histories: list[np.ndarray]  # everything before the test target (train + validation)

    @property
    def num_items(self) -> int:
        return len(self.artifacts.catalog)

    @property
    def test_users(self) -> np.ndarray:
        return np.flatnonzero(self.test >= 0)


def load_split(data: Path, artifacts: Artifacts) -> RecommendSplit:
    """Leave-one-out over the full log, checked against what the holdout build saw."""
    from sluice.data.interactions import load_data

    _, interactions = load_data(data, artifacts.catalog)
    train, valid, test = leave_one_out(interactions)
    histories = [np.append(t, v) if v >= 0 else t[:0] for t, v in zip(train, valid, strict=True)]
    split = RecommendSplit(artifacts, interactions.user_ids, train, valid, test, histories)
    _check_holdout(split)
    return split


def _check_holdout(split: RecommendSplit) -> None:
    """The build's user histories must be exactly train + validation (no test target)."""
    ids, hist = split.artifacts.users()
    built = dict(zip(ids, hist, strict=True))
    catalog = split.artifacts.catalog
    for u in split.test_users[:: max(1, len(split.test_users) // 500)].tolist():
        seen = built.get(split.user_ids[u])
        expected = catalog.item_ids[split.histories[u]]
        if seen is None or not np.array_equal(seen, expected):
            raise RuntimeError(
                f"the build's history of user {split.user_ids[u]} is not train + validation: "
                "was it built with --holdout 1 from the same data?"
            )


# -- scoring ranked lists with the shared metric code --------------------------------------
def list_metrics(
    lists: Sequence[np.ndarray],
    split: RecommendSplit,
    users: np.ndarray,
    ks: Sequence[int] = KS,
) -> dict[str, float]:
    """HR@K / NDCG@K of ranked lists of catalog rows (one per entry of ``users``).

    The lists become score rows (position ``i`` scores ``len - i``, items off
    the list ``-inf``) and go through :func:`sluice.eval.metrics.evaluate`
    with the user's history excluded, so an item off the list ranks below
    every listed one and a list never scores above its length.
    """
    n = split.num_items
    position = {int(u): i for i, u in enumerate(users.tolist())}

    def score(_hist: Sequence[np.ndarray], batch_users: np.ndarray) -> np.ndarray:
        out = np.full((len(batch_users), n), -np.inf, dtype=np.float32)
        for i, u in enumerate(batch_users.tolist()):
            rows = lists[position[int(u)]]
            rows = rows[rows >= 0]
            out[i, rows] = np.arange(len(rows), 0, -1, dtype=np.float32)
        return out

    targets = np.full(len(split.test), -1, dtype=np.int64)
    targets[users] = split.test[users]
    return evaluate(
        score, split.histories, targets, ks, extras=np.arange(len(split.test)), batch_size=256
    )


# -- served: the gateway over gRPC ----------------------------------------------------------
@dataclass
class ServedRun:
    lists: list[np.ndarray]  # catalog rows per user, best first
    degraded: int = 0  # responses with at least one degraded stage
    errors: int = 0
    seconds: float = 0.0
    latency_ms: list[float] = field(default_factory=list)


def fan_out(
    fn: Callable[[int], Any], count: int, threads: int, progress: bool, desc: str
) -> list[Any]:
    """``[fn(i) for i in range(count)]`` from a thread pool, results in order."""
    from tqdm.auto import tqdm

    results: list[Any] = [None] * count
    with (
        ThreadPoolExecutor(max_workers=threads) as pool,
        tqdm(total=count, desc=desc, disable=not progress, leave=False) as bar,
    ):

        def run(i: int) -> None:
            results[i] = fn(i)
            bar.update(1)

        for _ in pool.map(run, range(count)):
            pass
    return results


def served_recommend(
    address: str,
    split: RecommendSplit,
    users: np.ndarray,
    *,
    page_size: int = PAGE_SIZE,
    threads: int = 8,
    timeout_s: float = 30.0,
    progress: bool = True,
) -> ServedRun:
    """Send every user's ``Recommend`` to the gateway at ``address``; keep the pages."""
    import grpc

    from sluice.client import StorefrontClient

    client = StorefrontClient(address)
    catalog = split.artifacts.catalog
    stats = {"degraded": 0, "errors": 0}
    lock = threading.Lock()
    latency: list[float] = [0.0] * len(users)

    def one(i: int) -> np.ndarray:
        user = split.user_ids[int(users[i])]
        t0 = time.perf_counter()
        for attempt in range(3):
            try:
                resp = client.recommend(user, page_size=page_size, timeout_s=timeout_s)
                break
            except grpc.RpcError as err:
                if attempt == 2:
                    log.warning("recommend failed for %s: %s", user, err)
                    with lock:
                        stats["errors"] += 1
                    return np.zeros(0, np.int64)
                time.sleep(0.5)
        latency[i] = (time.perf_counter() - t0) * 1000
        if any(s.degraded for s in resp.stages):
            with lock:
                stats["degraded"] += 1
        return catalog.rows(np.asarray(resp.page.item_ids, dtype=np.int64))

    t0 = time.perf_counter()
    try:
        lists = fan_out(one, len(users), threads, progress, "served Recommend")
    finally:
        client.close()
    return ServedRun(lists, stats["degraded"], stats["errors"], time.perf_counter() - t0, latency)


# -- per stage: the gateway logic in process, the stage services over gRPC ----------------------
class _Recorder:
    """One stage client whose results are kept in the recorder of the calling thread."""

    def __init__(self, stage: StageName, inner: Any, owner: RecordingStages) -> None:
        self.stage = stage
        self.inner = inner
        self.owner = owner

    def call(self, ctx: RankContext, cands: Candidates | None, budget: Budget) -> StageResult:
        out: StageResult = self.inner.call(ctx, cands, budget)
        self.owner.record[self.stage.label] = out.candidates
        return out


class RecordingStages(dict[StageName, Any]):
    """The gateway's stage clients, keeping what each stage returned (per thread)."""

    def __init__(self, inner: Mapping[StageName, Any]) -> None:
        super().__init__({stage: _Recorder(stage, client, self) for stage, client in inner.items()})
        self._local = threading.local()

    @property
    def record(self) -> dict[str, Candidates]:
        rec: dict[str, Candidates] | None = getattr(self._local, "record", None)
        if rec is None:
            rec = {}
            self._local.record = rec
        return rec

    def reset(self) -> None:
        self._local.record = {}


def in_process_gateway(artifacts: Artifacts, stages: Any, encode_query: Any = None) -> Any:
    """The gateway's logic over ``stages``, with the users and limits the gateway service uses."""
    from sluice.config import GatewaySettings
    from sluice.gateway.pipeline import Gateway, GatewayLimits
    from sluice.gateway.spelling import speller_for
    from sluice.gateway.users import UserHistory, item_attributes
    from sluice.state.store import InMemoryStateStore

    settings = GatewaySettings()
    limits = GatewayLimits.from_settings(settings)
    store = InMemoryStateStore(item_attributes(artifacts.catalog))
    users = UserHistory.from_artifacts(artifacts, store)
    encoder = encode_query or (lambda q: np.zeros(384, np.float32))
    speller = speller_for(artifacts.catalog, settings)
    return Gateway(stages, artifacts.catalog, users, encoder, limits, speller=speller)


@dataclass
class StageRun:
    """Per user: the catalog rows each stage kept, best first."""

    recall: list[np.ndarray]
    coarse: list[np.ndarray]
    fine: list[np.ndarray]
    page: list[np.ndarray]
    degraded: int = 0


def stage_candidates(
    gateway: Any,
    recorder: RecordingStages,
    requests: Sequence[Callable[[Any], Any]],
    catalog: Any,
    *,
    threads: int = 8,
    progress: bool = True,
    desc: str = "per-stage",
) -> StageRun:
    """Run each request (``fn(gateway) -> PageResult``) and keep every stage's candidates."""

    def one(i: int) -> tuple[np.ndarray, ...] | None:
        recorder.reset()
        result = requests[i](gateway)
        rec = recorder.record
        empty = np.zeros(0, np.int64)

        def rows(name: str) -> np.ndarray:
            c = rec.get(name)
            return catalog.rows(c.item_ids) if c is not None else empty

        degraded = any(r.degraded for r in result.reports)
        fine = rows("fine") if "fine" in rec else rows("coarse")
        return (
            rows("recall"),
            rows("coarse"),
            fine,
            catalog.rows(result.candidates.item_ids),
            np.array([degraded]),
        )

    out = fan_out(one, len(requests), threads, progress, desc)
    return StageRun(
        [o[0] for o in out],
        [o[1] for o in out],
        [o[2] for o in out],
        [o[3] for o in out],
        int(sum(bool(o[4][0]) for o in out)),
    )


def hit_rate(lists: Sequence[np.ndarray], targets: np.ndarray, k: int) -> float:
    """Share of targets among the first ``k`` of their list."""
    if len(targets) == 0:
        return 0.0
    return float(np.mean([t in lst[:k] for lst, t in zip(lists, targets.tolist(), strict=True)]))


def stage_recall(run: StageRun, targets: np.ndarray) -> dict[str, float]:
    return {
        "recall@1000": hit_rate(run.recall, targets, 1000),
        "coarse@200": hit_rate(run.coarse, targets, 200),
        "coarse@50": hit_rate(run.coarse, targets, 50),
        "fine@50": hit_rate(run.fine, targets, 50),
        "fine@10": hit_rate(run.fine, targets, 10),
        "page@50": hit_rate(run.page, targets, 50),
        "page@10": hit_rate(run.page, targets, 10),
    }


def biggest_loss(recall: dict[str, float]) -> tuple[str, dict[str, float]]:
    """Where test targets drop out: (stage that loses the most, loss per stage)."""
    losses = {
        "recall (catalog → 1000)": 1.0 - recall["recall@1000"],
        "coarse (1000 → 200)": recall["recall@1000"] - recall["coarse@200"],
        "fine (200 → 10)": recall["coarse@200"] - recall["fine@10"],
        "rerank (fine top 10 → page top 10)": recall["fine@10"] - recall["page@10"],
    }
    return max(losses, key=lambda k: losses[k]), losses


# -- offline ------------------------------------------------------------------------------------
def offline_recommend(
    split: RecommendSplit,
    *,
    sasrec: bool = True,
    sasrec_budget_s: float = 900.0,
    cache: Path | None = None,
    progress: bool = True,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """Every model in process, by the other engineers' offline code, on the test targets."""
    from sluice.eval.baselines import CoocModel, PopularityModel
    from sluice.fine.model import FineRanker, RankerConfig
    from sluice.fine.train import full_scores, train_ranker

    n = split.num_items
    hist, test = split.histories, split.test
    out: dict[str, dict[str, float]] = {}

    def run(name: str, fn: Any) -> None:
        t0 = time.perf_counter()
        out[name] = evaluate(fn, hist, test, progress=progress, desc=name)
        out[name]["seconds"] = time.perf_counter() - t0
        _print_row(name, out[name])

    valid_seqs = [np.append(t, v) for t, v in zip(split.train, split.valid, strict=True) if v >= 0]
    everything = [np.append(h, t) if t >= 0 else h for h, t in zip(hist, test, strict=True)]
    run("popularity (train counts)", PopularityModel.fit(split.train, n).scores)
    run("popularity (train+valid counts)", PopularityModel.fit(hist, n).scores)
    run(
        "popularity (ALL counts, test leaked: the published PopRec)",
        PopularityModel.fit(everything, n).scores,
    )
    run("co-occurrence (train+valid)", CoocModel.fit(hist, n).scores)
    ranker = FineRanker.load(split.artifacts.ranker_dir)
    run("fine ranker as built (ids + text), full ranking", partial(full_scores, ranker))

    if sasrec:
        cached = _load_json(cache) if cache is not None else None
        key = {"budget_s": sasrec_budget_s, "seed": seed, "config": asdict(RankerConfig())}
        if cached is not None and cached.get("key") == key:
            out["SASRec (ids only, same trainer)"] = cached["metrics"]
            _print_row("SASRec (ids only, same trainer) [cached]", cached["metrics"])
        else:
            cfg = RankerConfig(use_text=False)
            t0 = time.perf_counter()
            model = train_ranker(
                split.train,
                n,
                None,
                cfg,
                seed=seed,
                valid_sequences=valid_seqs,
                progress=progress,
                time_budget_s=sasrec_budget_s,
            )
            train_s = time.perf_counter() - t0
            run("SASRec (ids only, same trainer)", partial(full_scores, model))
            metrics = out["SASRec (ids only, same trainer)"]
            metrics["train_seconds"] = train_s
            metrics |= {f"train_{k}": float(v) for k, v in model.train_info.items()}
            if cache is not None:
                cache.write_text(json.dumps({"key": key, "metrics": metrics}, indent=1))
    return out


def _load_json(path: Path | None) -> dict[str, Any] | None:
    if path is None or not path.exists():
        return None
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def _print_row(name: str, m: dict[str, float]) -> None:
    cells = " | ".join(f"{m[f'HR@{k}']:.4f}" for k in KS)
    cells += " | " + " | ".join(f"{m[f'NDCG@{k}']:.4f}" for k in KS)
    print(f"| {name} | {cells} |", flush=True)


# -- the whole run ----------------------------------------------------------------------------
@dataclass
class RecommendOptions:
    data: Path
    rebuild: bool = False
    users: int = 0  # 0: every test user; else a seeded sample
    threads: int = 8
    stage_users: int = 0  # 0: the same users as served
    offline: bool = True
    sasrec: bool = True
    sasrec_budget_s: float = 900.0
    served: bool = True
    stages: bool = True
    ablation_users: int = 0  # in-process variants of the cascade on a sample (0: skip)
    exposure: bool = False  # re-ranking variants' exposure and quality (sluice.eval.exposure)
    arms: Path | None = None  # an experiments file: two arms replayed (sluice.eval.arms)
    experiment: str | None = None
    compare: tuple[str, str] | None = None
    pages: Path | None = None  # in-process pages: written, or compared when the file exists
    seed: int = 0
    progress: bool = True
    root: Path | None = None
    build_kwargs: dict[str, Any] = field(default_factory=dict)


def sample_users(split: RecommendSplit, count: int, seed: int) -> np.ndarray:
    users = split.test_users
    if 0 < count < len(users):
        users = np.sort(np.random.default_rng(seed).choice(users, count, replace=False))
    return users


def run_recommend(opts: RecommendOptions) -> dict[str, Any]:
    from sluice.launch import Cluster, Ports

    torch.set_num_threads(2)
    base = opts.root or eval_dir(opts.data)
    artifacts = ensure_build(
        opts.data,
        holdout=1,
        rebuild=opts.rebuild,
        root=base,
        progress=opts.progress,
        **opts.build_kwargs,
    )
    split = load_split(opts.data, artifacts)
    users = sample_users(split, opts.users, opts.seed)
    path = base / "recommend-report.json"
    previous = _load_json(path) or {}
    same_build = previous.get("build", {}).get("version") == artifacts.manifest.get("version")
    report: dict[str, Any] = (previous if same_build else {}) | {
        "dataset": str(opts.data),
        "artifacts": str(artifacts.root),
        "build": {
            k: artifacts.manifest.get(k) for k in ("version", "num_items", "num_interactions")
        }
        | {"fine_ranker": artifacts.manifest.get("fine_ranker")}
        | {"cost": _load_json(artifacts.root / "build-cost.json")},
        "users": len(users),
        "protocol": "leave-one-out by time; full ranking; history excluded; holdout build",
    }
    header = "| model | HR@10 | HR@20 | HR@50 | NDCG@10 | NDCG@20 | NDCG@50 |\n|" + "---|" * 7
    print(f"\n{opts.data.name}: {len(split.test_users)} test users, {split.num_items} items")
    if opts.offline:
        print("\noffline (in process, full ranking)\n" + header, flush=True)
        report["offline"] = offline_recommend(
            split,
            sasrec=opts.sasrec,
            sasrec_budget_s=opts.sasrec_budget_s,
            cache=base / "sasrec.json",
            progress=opts.progress,
            seed=opts.seed,
        )
    if opts.ablation_users:
        report["ablations"] = ablations(split, opts.ablation_users, opts.seed, header)
    if opts.exposure:
        from sluice.eval.exposure import exposure_section

        report["exposure"] = exposure_section(split, users)
    if opts.arms is not None:
        from sluice.eval.arms import arms_section

        report["arms"] = arms_section(split, users, opts.arms, opts.experiment, opts.compare)
    if opts.pages is not None:
        report["in_process"] = _in_process_section(split, users, opts, header)
    if opts.served or opts.stages:
        with tempfile.TemporaryDirectory(prefix="sluice-eval-") as tmp:
            cluster = Cluster(
                artifacts=artifacts.root,
                ports=Ports.random(),
                log_dir=base / "logs",
                event_log_dir=Path(tmp) / "events",  # no live events: histories are the build's
            )
            print(f"\nstarting Triton and the services (logs in {base / 'logs'}) …", flush=True)
            cluster.start(timeout_s=600)
            try:
                if opts.served:
                    report["served"] = _served_section(cluster, split, users, opts, header)
                if opts.stages:
                    report["stages"] = _stage_section(cluster, split, users, opts)
            finally:
                cluster.stop()
    path.write_text(json.dumps(report, indent=1, default=float))
    print(f"\nreport: {path}")
    return report


def local_stages(
    artifacts: Artifacts,
    rerank: dict[str, Any] | None = None,
    fusion: Any = None,
    torch_threads: int | None = None,
) -> dict[StageName, Any]:
    """The four stages in this process, loaded through the services' wiring, with the ranker
    in process (``TorchBackend``) and the given settings changed (``rerank``: fields of
    :class:`~sluice.config.RerankSettings`)."""
    from sluice.gateway.stages import LocalStage
    from sluice.wiring import load_engines

    fine: dict[str, Any] = {"backend": "torch"}
    if torch_threads:
        fine["torch_threads"] = torch_threads
    closers: list[Callable[[], None]] = []  # nothing to close without a shared state store
    engines = load_engines(artifacts.root, closers, {"fine": fine, "rerank": rerank or {}})
    if fusion is not None:
        engines[StageName.FINE_RANK].fusion = fusion
    return {stage: LocalStage(stage, engine) for stage, engine in engines.items()}


class _Skipped:
    """A stage that is skipped: the gateway degrades around it."""

    def __init__(self, stage: StageName) -> None:
        self.stage = stage

    def call(self, ctx: RankContext, cands: Candidates | None, budget: Budget) -> StageResult:
        from sluice.core.errors import Unavailable

        raise Unavailable(f"{self.stage.label} stage skipped for the ablation")


def ablations(
    split: RecommendSplit, count: int, seed: int, header: str, threads: int = 2
) -> dict[str, dict[str, float]]:
    """The cascade in process on a user sample, as deployed and with one stage changed.

    Tells which stage's ordering helps or hurts: the rerank's MMR diversity,
    the fine stage's fusion (by β alone, without the signal weights; the model's score
    alone), the fine stage itself.
    """
    from sluice.fine.fusion import FusionWeights

    a = split.artifacts
    users = sample_users(split, count, seed + 2)
    deployed = FusionWeights.load(a.root / "fusion.json")
    variants: dict[str, Any] = {
        "as deployed (in process)": local_stages(a),
        "rerank MMR off (diversity_lambda 1.0)": local_stages(a, rerank={"diversity_lambda": 1.0}),
        "fine score alone (fusion beta 0)": local_stages(
            a, fusion=FusionWeights(0.0, deployed.search)
        ),
        "no fine stage (coarse order, then rerank)": local_stages(a)
        | {StageName.FINE_RANK: _Skipped(StageName.FINE_RANK)},
    }
    if deployed.signals:  # the build's β alone, as recommendation fused before the signals
        variants["fusion by beta, no signal weights"] = local_stages(
            a, fusion=FusionWeights(deployed.recommend, deployed.search)
        )
    out: dict[str, dict[str, float]] = {}
    print(f"\nablations: the cascade in process on {len(users)} sampled test users\n" + header)
    for name, stages in variants.items():
        recorder = RecordingStages(stages)
        gateway = in_process_gateway(a, recorder)
        requests = [
            partial(_recommend_request, user=split.user_ids[int(u)], surface=Surface.HOME)
            for u in users.tolist()
        ]
        run = stage_candidates(
            gateway, recorder, requests, a.catalog, threads=threads, progress=False
        )
        out[name] = list_metrics(run.page, split, users)
        _print_row(name, out[name])
    return out


def _served_section(
    cluster: Any, split: RecommendSplit, users: np.ndarray, opts: RecommendOptions, header: str
) -> dict[str, Any]:
    run = served_recommend(
        cluster.gateway_address, split, users, threads=opts.threads, progress=opts.progress
    )
    metrics = list_metrics(run.lists, split, users)
    lat = np.asarray(run.latency_ms)
    print(f"\nserved (gateway over gRPC, Recommend page_size {PAGE_SIZE})\n" + header)
    _print_row("Sluice served cascade", metrics)
    print(
        f"{len(users)} requests in {run.seconds:.0f} s from {opts.threads} threads, "
        f"p50 {np.percentile(lat, 50):.0f} ms, p99 {np.percentile(lat, 99):.0f} ms; "
        f"degraded {run.degraded}, errors {run.errors}",
        flush=True,
    )
    return {
        "metrics": metrics,
        "degraded": run.degraded,
        "errors": run.errors,
        "seconds": run.seconds,
        "latency_ms_p50": float(np.percentile(lat, 50)),
        "latency_ms_p99": float(np.percentile(lat, 99)),
    }


def _stage_section(
    cluster: Any, split: RecommendSplit, users: np.ndarray, opts: RecommendOptions
) -> dict[str, Any]:
    from sluice.gateway.stages import GrpcStage
    from sluice.wiring import STAGES

    p = cluster.ports
    stage_users = users
    if 0 < opts.stage_users < len(users):
        rng = np.random.default_rng(opts.seed + 1)
        stage_users = np.sort(rng.choice(users, opts.stage_users, replace=False))
    grpc_stages = {
        e.stage: GrpcStage(e.binding(), f"127.0.0.1:{getattr(p, e.name)}") for e in STAGES
    }
    recorder = RecordingStages(grpc_stages)
    gateway = in_process_gateway(split.artifacts, recorder)
    requests = [
        partial(_recommend_request, user=split.user_ids[int(u)], surface=Surface.HOME)
        for u in stage_users.tolist()
    ]
    try:
        run = stage_candidates(
            gateway,
            recorder,
            requests,
            split.artifacts.catalog,
            threads=opts.threads,
            progress=opts.progress,
        )
    finally:
        for client in grpc_stages.values():
            client.close()
    recall = stage_recall(run, split.test[stage_users])
    worst, losses = biggest_loss(recall)
    print("\nper-stage recall (share of test targets still among the candidates)")
    print("| after | kept |\n|---|---|")
    for name, value in recall.items():
        print(f"| {name} | {value:.4f} |")
    print("loss per stage: " + ", ".join(f"{k} {v:.4f}" for k, v in losses.items()))
    print(f"the stage that loses the most: {worst}; degraded requests {run.degraded}", flush=True)
    return {
        "users": len(stage_users),
        "recall": recall,
        "losses": losses,
        "worst": worst,
        "degraded": run.degraded,
    }


def in_process_pages(
    split: RecommendSplit,
    users: np.ndarray,
    *,
    page_size: int = PAGE_SIZE,
    threads: int = 2,
    progress: bool = True,
) -> StageRun:
    """Each user's Recommend (the home page) through the cascade in this
    process, loaded through the services' wiring with the ranker in process
    (:func:`local_stages`): what a code change that claims to keep quality is compared on."""
    recorder = RecordingStages(local_stages(split.artifacts))
    gateway = in_process_gateway(split.artifacts, recorder)
    requests = [
        partial(_recommend_request, user=split.user_ids[int(u)], page_size=page_size)
        for u in users.tolist()
    ]
    return stage_candidates(
        gateway,
        recorder,
        requests,
        split.artifacts.catalog,
        threads=threads,
        progress=progress,
        desc="in process",
    )


def save_pages(path: Path, users: np.ndarray, targets: np.ndarray, pages: list[np.ndarray]) -> None:
    """The users, their targets and their pages (catalog rows), for :func:`compare_pages`."""
    lengths = np.array([len(p) for p in pages], np.int64)
    flat = np.concatenate(pages) if pages else np.zeros(0, np.int64)
    with path.open("wb") as f:  # np.savez would add ".npz" to a name without it
        np.savez(f, users=users, targets=targets, lengths=lengths, pages=flat)


def compare_pages(
    baseline: Path, users: np.ndarray, targets: np.ndarray, pages: list[np.ndarray]
) -> dict[str, Any]:
    """This run's pages against a file :func:`save_pages` wrote for the same users: how many
    top 10s and whole pages are the same ids in the same order, and the per-user HR@10 and
    NDCG@10 differences (this run minus the baseline) with 95% paired-bootstrap intervals."""
    from sluice.eval.arms import paired_difference
    from sluice.eval.replay import per_user

    with np.load(baseline) as f:
        if not (np.array_equal(f["users"], users) and np.array_equal(f["targets"], targets)):
            raise ValueError(f"{baseline} holds other users or targets than this run")
        before = np.split(f["pages"], np.cumsum(f["lengths"])[:-1]) if len(users) else []
    hr0, ndcg0 = per_user(before, targets)
    hr1, ndcg1 = per_user(pages, targets)
    pairs = list(zip(before, pages, strict=True))
    out: dict[str, Any] = {
        "baseline": str(baseline),
        "users": len(users),
        "same_top10": sum(np.array_equal(a[:10], b[:10]) for a, b in pairs),
        "same_page": sum(np.array_equal(a, b) for a, b in pairs),
    }
    for name, old, new in (("HR@10", hr0, hr1), ("NDCG@10", ndcg0, ndcg1)):
        out[name] = {"baseline": float(old.mean()), "now": float(new.mean())} | (
            paired_difference(old, new) if len(users) > 1 else {}
        )
    return out


def _in_process_section(
    split: RecommendSplit, users: np.ndarray, opts: RecommendOptions, header: str
) -> dict[str, Any]:
    assert opts.pages is not None
    started = time.perf_counter()
    run = in_process_pages(split, users, progress=opts.progress)
    metrics = list_metrics(run.page, split, users)
    print(f"\nin process (the services' wiring, the ranker in process, page {PAGE_SIZE})")
    print(header)
    _print_row("Sluice in-process cascade", metrics)
    print(f"{len(users)} users in {time.perf_counter() - started:.0f} s; degraded {run.degraded}")
    targets = split.test[users]
    section: dict[str, Any] = {"metrics": metrics, "degraded": run.degraded}
    if not opts.pages.exists():
        save_pages(opts.pages, users, targets, run.page)
        print(f"pages written to {opts.pages}: run again from the other checkout to compare")
        return section | {"pages": str(opts.pages)}
    diff = compare_pages(opts.pages, users, targets, run.page)
    print(
        f"against {opts.pages}: the same top 10 for {diff['same_top10']} of {len(users)} "
        f"users, the same page for {diff['same_page']}"
    )
    for name in ("HR@10", "NDCG@10"):
        d = diff[name]
        interval = f" (95% CI {d['low']:+.4f} to {d['high']:+.4f})" if "low" in d else ""
        print(
            f"{name}: {d['baseline']:.4f} -> {d['now']:.4f}, "
            f"difference {d['now'] - d['baseline']:+.4f}{interval}"
        )
    return section | {"against_baseline": diff}


def _recommend_request(
    gateway: Any, user: str, surface: Surface = Surface.HOME, page_size: int = PAGE_SIZE
) -> Any:
    return gateway.recommend(user_id=user, surface=surface, page_size=page_size, deadline_s=30.0)
