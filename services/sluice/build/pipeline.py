"""``sluice build``: from a catalog and an interaction log to served artifacts.

Steps: load (or generate) the data, optionally hold out each user's last
interactions for evaluation, embed item text with MiniLM, build the BM25 and
FAISS indexes, count co-occurrence and popularity, train the fine ranker and
export it into the Triton model repository as a new version, and fit the
coarse ranker on recall's own candidates.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from importlib.abc import Traversable
from pathlib import Path

import numpy as np

from sluice import paths
from sluice.artifacts import MANIFEST, Artifacts, save_cooc, save_users
from sluice.builds import new_build_id
from sluice.data.catalog import Catalog
from sluice.data.interactions import Interactions, load_data
from sluice.data.products import is_search_only, load_products
from sluice.data.synthetic import ShopSpec, generate_shop
from sluice.fine.fusion import COARSE_DECIDES_BETA
from sluice.fine.model import RankerConfig

log = logging.getLogger(__name__)


@dataclass
class BuildOptions:
    """What to build and where."""

    out: Path
    data: Path | None = None  # None: the embedded synthetic shop
    shop: ShopSpec = field(default_factory=ShopSpec)
    model_repository: Path = field(default_factory=paths.default_model_repository)
    holdout: int = 0  # drop each user's last n interactions (leave-one-out evaluation)
    seed: int = 0
    epochs: int = 200
    train_budget_s: float = 1080.0
    ranker: RankerConfig = field(default_factory=RankerConfig)
    coarse_users: int = 3000
    # when the catalog data was exported, unix ms (live catalog updates accepted before it
    # are not applied to this build); None: when the build started
    catalog_as_of_ms: int | None = None
    cache_dir: Path = field(default_factory=lambda: paths.var("cache"))
    progress: bool = True
    build_id: str = ""  # "": a new one (sluice.builds.new_build_id)
    shards: int = 0  # recall shards to cut (sluice.recall.shards); 0: none
    valid_users: int = 0  # users the ranker's early stopping validates on; 0: every user
    shard_index_kind: str = "auto"
    encoder: str = "minilm"  # build-time text encoder (sluice.embed.batch.BUILD_ENCODERS)


class Console:
    """The build's progress lines, on standard error."""

    def print(self, line: str) -> None:
        print(line, file=sys.stderr, flush=True)


class _Steps:
    def __init__(self, console: Console) -> None:
        self.console = console
        self.timings: dict[str, float] = {}

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        self.console.print(f"▶ {name} …")
        t0 = time.perf_counter()
        yield
        dt = time.perf_counter() - t0
        self.timings[name] = round(dt, 2)
        self.console.print(f"✓ {name} ({dt:.1f} s)")


def load_dataset(options: BuildOptions) -> tuple[Catalog, Interactions, str]:
    """The catalog and interaction log: generated, the amazon-beauty layout, the
    UniSRec/RecBole layout (amazon-scientific: ``P.text``, ``P.item2index``,
    ``P.user2index``, ``P.{train,valid,test}.inter``; no timestamps), or a
    search-only products catalog (crowdflower-search layout, no interactions).
    :func:`sluice.data.interactions.load_data` picks between the first two."""
    if options.data is None:
        catalog, interactions = generate_shop(options.shop)
        return (
            catalog,
            interactions,
            f"synthetic(items={options.shop.num_items}, seed={options.shop.seed})",
        )
    source = str(options.data.resolve())  # the folder wherever the build is run from
    if is_search_only(options.data):
        return load_products(options.data), no_interactions(), source
    catalog, interactions = load_data(options.data)
    return catalog, interactions, source


def no_interactions() -> Interactions:
    return Interactions(
        user_ids=[],
        user_index=np.zeros(0, np.int32),
        item_rows=np.zeros(0, np.int64),
        timestamps=np.zeros(0, np.int64),
    )


def has_judgments(data: Path | None) -> bool:
    from sluice.data.products import QRELS, QUERIES

    return data is not None and (data / QUERIES).exists() and (data / QRELS).exists()


def _judgments(options: BuildOptions) -> Path | None:
    """The dataset directory when it carries judged queries (search weights fit on them)."""
    return options.data if options.data is not None and has_judgments(options.data) else None


def fit_search_on_judgments(artifacts: Artifacts, data: Path, console: Console) -> np.ndarray:
    """Search weights of the coarse ranker fitted on a dataset's judged queries.

    A pairwise logistic regression over the few ``SEARCH_FEATURES`` of the
    cascade's own recall candidates (``sluice eval search`` reports its k-fold
    cross-validation, the estimate for unseen queries).
    """
    from sluice.coarse.engine import FEATURES, SEARCH_FEATURES
    from sluice.data.products import load_queries
    from sluice.eval.search import (
        as_searched,
        collect_samples,
        fit_pairwise,
        query_encoder,
        sample_ndcg,
    )

    queries = as_searched(artifacts.catalog, load_queries(data))
    samples = collect_samples(artifacts, queries, query_encoder(queries.texts))
    columns = [FEATURES.index(f) for f in SEARCH_FEATURES]
    w = fit_pairwise(samples, columns)
    weights = np.zeros(len(FEATURES), np.float32)
    weights[columns] = w
    console.print(
        f"  search weights fitted on {len(queries)} judged queries: "
        + ", ".join(f"{f} {v:+.3f}" for f, v in zip(SEARCH_FEATURES, w, strict=True))
        + f" (in-sample NDCG@10 {sample_ndcg(samples, w, columns):.4f})"
    )
    return weights


def next_version(repository: Path, model: str = "fine_ranker") -> int:
    folder = repository / model
    versions = (
        [int(p.name) for p in folder.glob("[0-9]*") if p.name.isdigit()] if folder.exists() else []
    )
    return max(versions, default=0) + 1


def export_ranker(model_dir_writer: Callable[[Path], None], repository: Path) -> tuple[Path, int]:
    """Write a new fine_ranker version into a Triton model repository.

    The model's configs come from the package (:func:`sluice.paths.model_templates`) and are
    written only where the repository has none: an operator's edited config is kept.
    """
    template = paths.model_templates() / "fine_ranker"
    target = repository / "fine_ranker"
    _copy_missing(template, target)
    version = next_version(repository)
    version_dir = target / str(version)
    # written aside and renamed into place: a Triton that polls the repository (a server
    # swapping builds without restart) never loads a half-written version
    partial = target / f".partial-{version}-{os.getpid()}"
    model_dir_writer(partial)
    (partial / "model.py").write_bytes((template / "model.py").read_bytes())
    partial.rename(version_dir)
    return version_dir, version


def _copy_missing(source: Traversable, target: Path) -> None:
    """Copy the config files of ``source`` (not ``model.py``) that ``target`` lacks."""
    target.mkdir(parents=True, exist_ok=True)
    for entry in source.iterdir():
        if entry.name == "__pycache__":
            continue
        if entry.is_dir():
            _copy_missing(entry, target / entry.name)
        elif entry.name != "model.py" and not (target / entry.name).exists():
            (target / entry.name).write_bytes(entry.read_bytes())


def fit_cascade(
    artifacts: Artifacts,
    sequences: list[np.ndarray],
    pseudo: np.ndarray | None,
    *,
    coarse_users: int,
    seed: int,
    judgments: Path | None,
    steps: _Steps,
    console: Console,
) -> None:
    """Fit the coarse weights and the fine/coarse fusion of a build (its last two steps).

    Both fit on held-out requests (each user's last item as the target) against recall and
    coarse features recounted without those targets (:class:`FittingView`).
    """
    from sluice.coarse.training import FittingView, fit_coarse, training_contexts
    from sluice.fine.fusion import FusionWeights
    from sluice.fine.fusion_training import fit_fusion

    out = artifacts.root
    search_only = not any(len(s) for s in sequences)
    view = FittingView.without_last_items(artifacts, sequences)
    with steps.step("fit the coarse ranker on recall candidates"):
        rec, search = training_contexts(artifacts, sequences, coarse_users, seed, pseudo)
        weights = fit_coarse(view, rec, search, seed=seed)
        if judgments is not None:
            weights.search = fit_search_on_judgments(artifacts, judgments, console)
        weights.save(out / "coarse.json")

    with steps.step("fit the fine/coarse score fusion on other held-out requests"):
        if search_only:
            # without interactions the transformer has no behaviour to learn from: it is exported
            # untrained (Triton still serves the stage, for a shop that later brings behaviour or
            # its own model) and the fine stage keeps the coarse order without running it
            fusion = FusionWeights(COARSE_DECIDES_BETA, COARSE_DECIDES_BETA)
        else:
            # search's beta needs few requests; the recommendation signals' weights more
            rec, _ = training_contexts(artifacts, sequences, coarse_users, seed + 1, None)
            _, search = training_contexts(
                artifacts, sequences, min(coarse_users // 2, 500), seed + 1, pseudo
            )
            fusion = fit_fusion(artifacts, view, rec, search)
        fusion.save(out / "fusion.json")
        console.print(f"  fusion beta: recommend {fusion.recommend}, search {fusion.search}")
        if fusion.signals:
            console.print(
                "  recommendation signals: "
                + ", ".join(f"{k} {v:+.3f}" for k, v in fusion.signals.items())
            )


def refit(options: BuildOptions) -> Artifacts:
    """Fit the coarse weights and the fusion of the build at ``options.out`` again.

    For a change to the coarse features or to how they are fitted: the ranker, the vectors
    and the indexes stay; the data is read again to rebuild the same held-out requests.
    """
    from sluice.eval.offline import pseudo_query_table

    console = Console()
    steps = _Steps(console)
    artifacts = Artifacts(options.out)
    with steps.step("load data"):
        catalog, interactions, _ = load_dataset(options)
        held = interactions.drop_last(options.holdout)
        built = artifacts.manifest
        if (built.get("num_items"), built.get("num_interactions"), built.get("holdout")) != (
            len(catalog),
            len(held),
            options.holdout,
        ):
            raise ValueError(f"{options.out} was built from other data or another holdout")
        pseudo = pseudo_query_table(
            catalog,
            per_item=2,
            seed=options.seed,
            cache_dir=options.cache_dir,
            progress=False,
            encoder=options.encoder,
        )
    fit_cascade(
        artifacts,
        held.sequences(),
        pseudo,
        coarse_users=options.coarse_users,
        seed=options.seed,
        judgments=_judgments(options),
        steps=steps,
        console=console,
    )
    console.print(f"refitted {options.out}")
    return Artifacts(options.out)


def build(options: BuildOptions) -> Artifacts:
    """Run every build step and return the new artifacts."""
    started_ms = time.time_ns() // 1_000_000
    from sluice.coarse.training import COOC_TOP_K
    from sluice.embed.onnx import INT8_FILE, ONNX_FILE, export_onnx, quantize_int8
    from sluice.eval.baselines import CoocModel
    from sluice.eval.offline import pseudo_query_table, text_table
    from sluice.fine.train import train_ranker
    from sluice.recall.ann_index import AnnIndex, build_index
    from sluice.recall.lexical import LexicalIndex

    console = Console()
    steps = _Steps(console)
    out = options.out
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)
    rng_seed = options.seed

    with steps.step("load data"):
        catalog, interactions, source = load_dataset(options)
        held = interactions.drop_last(options.holdout)
        sequences = held.sequences()
        console.print(
            f"  {len(catalog):,} items, {interactions.num_users:,} users, "
            f"{len(interactions):,} interactions "
            f"({len(held):,} after holding out {options.holdout})"
        )
        catalog.save(out)

    with steps.step("embed item text (all-MiniLM-L6-v2)"):
        table = text_table(
            catalog,
            cache_dir=options.cache_dir,
            progress=options.progress,
            encoder=options.encoder,
        )
        text_vectors = np.ascontiguousarray(table[1:])
        np.save(out / "text_vectors.npy", text_vectors)

    with steps.step("export the query encoder (ONNX, fp32 and int8)"):
        export_onnx(out / ONNX_FILE)
        quantize_int8(out / ONNX_FILE, out / INT8_FILE)

    with steps.step("lexical index (BM25)"):
        LexicalIndex.build(catalog.titles, catalog.descriptions or None).save(out / "lexical")

    with steps.step("popularity and co-occurrence"):
        popularity = np.bincount(held.item_rows, minlength=len(catalog)).astype(np.float32)
        np.save(out / "popularity.npy", popularity)
        cooc = CoocModel.fit(sequences, len(catalog))
        top_rows, top_scores = cooc.topk(COOC_TOP_K)
        save_cooc(out / "cooc.npz", cooc.matrix, top_rows, top_scores)

    search_only = len(held) == 0
    with steps.step("train the fine ranker"):
        valid = [s for s in sequences if len(s) >= 3]
        if 0 < options.valid_users < len(valid):  # full ranking of 1M items is costly
            keep = np.random.default_rng(rng_seed).choice(len(valid), options.valid_users, False)
            valid = [valid[i] for i in np.sort(keep)]
        train_seqs = [s[:-1] for s in sequences]
        pseudo = pseudo_query_table(
            catalog,
            per_item=2,
            seed=rng_seed,
            cache_dir=options.cache_dir,
            progress=options.progress,
            encoder=options.encoder,
        )
        if search_only:
            import torch

            from sluice.fine.model import FineRanker

            torch.manual_seed(rng_seed)
            ranker = FineRanker(len(catalog), table, options.ranker).eval()
            info: dict[str, object] = {"untrained": "no interactions; coarse score decides"}
            console.print("  no interactions: the ranker is exported untrained (see fusion)")
        else:
            ranker = train_ranker(
                train_seqs,
                len(catalog),
                table,
                options.ranker,
                epochs=options.epochs,
                seed=rng_seed,
                valid_sequences=valid,
                progress=options.progress,
                time_budget_s=options.train_budget_s,
                pseudo_queries=pseudo,
            )
            info = dict(getattr(ranker, "train_info", {}))
        from sluice.fine.onnx_export import save_version

        # torch files (in-process scoring, benchmarks) and model.onnx (what Triton serves)
        # the pseudo-queries (3 GiB at 1M items) are cached on disk: read back for the fit
        # below, so that the export's copies of the model do not sit on top of them
        del pseudo
        version_dir, version = export_ranker(
            functools.partial(save_version, ranker), options.model_repository
        )
        console.print(f"  exported {version_dir} {info}")

    with steps.step("item vectors and FAISS indexes"):
        import torch

        with torch.inference_mode():
            vectors = ranker.all_item_vectors()[1:].float().numpy()
        if search_only:  # no behaviour: similar items by text
            vectors = text_vectors.copy()
        vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-9)
        behaviour_vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        np.save(out / "behaviour_vectors.npy", behaviour_vectors)
        AnnIndex(build_index(behaviour_vectors, "auto")).save(out / "behaviour.faiss")
        AnnIndex(build_index(text_vectors, "auto")).save(out / "text.faiss")

    with steps.step("users' histories"):
        user_hist = [catalog.item_ids[s] for s in sequences]
        save_users(out / "users.npz", held.user_ids, user_hist)

    if options.shards:
        from sluice.build.shards import write_shards

        with steps.step(f"recall shards ({options.shards})"):
            write_shards(Artifacts(out), options.shards, options.shard_index_kind)

    manifest = {
        "build_id": options.build_id or new_build_id(),
        # live catalog changes accepted before this are in the data, or older than it
        "catalog_as_of_ms": options.catalog_as_of_ms or started_ms,
        "version": time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()),
        "dataset": source,
        "holdout": options.holdout,
        "seed": rng_seed,
        "num_items": len(catalog),
        "num_users": interactions.num_users,
        "num_interactions": len(held),
        "text_encoder": options.encoder,
        "fine_ranker": {
            "repository": str(options.model_repository.resolve()),
            "version": version,
            "config": asdict(options.ranker),
            "train": info,
        },
        "timings_s": steps.timings,
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2))
    artifacts = Artifacts(out)
    # the fit reads the build back from disk: what was made in memory goes first
    del table, text_vectors, cooc, top_rows, top_scores, ranker, vectors, behaviour_vectors
    pseudo = pseudo_query_table(
        catalog,
        per_item=2,
        seed=rng_seed,
        cache_dir=options.cache_dir,
        progress=False,
        encoder=options.encoder,
    )

    fit_cascade(
        artifacts,
        sequences,
        pseudo,
        coarse_users=options.coarse_users,
        seed=rng_seed,
        judgments=_judgments(options),
        steps=steps,
        console=console,
    )
    manifest["timings_s"] = steps.timings
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2))
    console.print(f"built {out} (fine_ranker version {version})")
    return Artifacts(out)
