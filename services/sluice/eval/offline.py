"""Offline evaluation: leave-one-out, full ranking, every model side by side.

``python -m sluice.eval.offline --data ../shared/data/amazon-beauty``

Models are fitted on the training sequences (all but each user's last two
items), early-stopped on the validation targets, and scored on the test
targets with history = everything before the target. Popularity is counted
twice, over training sequences only and over train + validation (everything
that precedes the test targets); neither counts test targets. Also reports how
often the recall sources (a cheap user vector over the ranker's item vectors,
co-occurrence neighbours, both) keep the test target in their top 200 / 1000.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from sluice.data.catalog import Catalog
from sluice.data.interactions import load_catalog, load_interactions
from sluice.eval.baselines import (
    COOC_WINDOW,
    CoocModel,
    PopularityModel,
    neighbour_table_scores,
)
from sluice.eval.metrics import KS, ScoreFn, evaluate, leave_one_out, mask_history
from sluice.fine.model import FineRanker, RankerConfig
from sluice.fine.train import full_scores, make_pseudo_queries, pseudo_query_texts, train_ranker

log = logging.getLogger(__name__)

DEFAULT_CACHE = Path("/tmp/sluice-cache")
RECALL_KS = (200, 1000)


# -- cached text features -------------------------------------------------------
def _key(catalog: Catalog) -> str:
    digest = hashlib.sha1("\n".join(catalog.titles).encode()).hexdigest()[:12]
    return f"{len(catalog)}-{digest}"


def text_table(
    catalog: Catalog,
    cache_dir: Path = DEFAULT_CACHE,
    progress: bool = True,
    encoder: str = "minilm",
) -> np.ndarray:
    """MiniLM title embeddings by dense index ``[n + 1, 384]`` (row 0 zeros), cached.

    ``encoder``: a :data:`sluice.embed.batch.BUILD_ENCODERS` choice; the default is the
    original path (same cache file, same vectors), the others cache under their own name.
    """
    from sluice.embed.batch import build_encoder, encode_distinct, text_encoder

    choice = build_encoder(encoder)
    path = cache_dir / f"titles-{_key(catalog)}{choice.cache_tag}.npy"
    if path.exists():
        cached: np.ndarray = np.load(path)
        return cached
    model = text_encoder(choice, cache_dir)
    texts = [catalog.text(r) for r in range(len(catalog))]
    if choice.onnx_int8:
        table = np.zeros((len(catalog) + 1, model.dim), dtype=np.float32)
        encode_distinct(model, texts, progress=progress, out=table[1:])
    else:
        vectors = model.encode(texts, progress=progress)
        table = np.zeros((len(catalog) + 1, vectors.shape[1]), dtype=np.float32)
        table[1:] = vectors
    cache_dir.mkdir(parents=True, exist_ok=True)
    np.save(path, table)
    return table


def pseudo_query_table(
    catalog: Catalog,
    per_item: int,
    seed: int,
    cache_dir: Path = DEFAULT_CACHE,
    progress: bool = True,
    encoder: str = "minilm",
) -> np.ndarray:
    """Pseudo-query embeddings ``[n + 1, per_item, 384]`` (see ``make_pseudo_queries``), cached.

    ``encoder`` as for :func:`text_table`.
    """
    from sluice.embed.batch import build_encoder, encode_distinct, text_encoder

    choice = build_encoder(encoder)
    path = cache_dir / f"pseudo-queries-{_key(catalog)}-{per_item}-{seed}{choice.cache_tag}.npy"
    if path.exists():
        cached: np.ndarray = np.load(path)
        return cached
    model = text_encoder(choice, cache_dir)
    if choice.onnx_int8:  # the texts of make_pseudo_queries, each distinct one encoded once
        texts = pseudo_query_texts(catalog.titles, per_item, seed)
        table = np.zeros((len(catalog) + 1, per_item, model.dim), dtype=np.float32)
        encode_distinct(model, texts, progress=progress, out=table[1:].reshape(len(texts), -1))
    else:
        table = make_pseudo_queries(catalog.titles, model, per_item, seed, progress=progress)
    cache_dir.mkdir(parents=True, exist_ok=True)
    np.save(path, table)
    return table


# -- data -------------------------------------------------------------------
@dataclass
class Split:
    """Leave-one-out split of a dataset; item ids are catalog rows."""

    catalog: Catalog
    train: list[np.ndarray]  # all but the last two items per user
    valid_seqs: list[np.ndarray]  # train + validation target (the last item is the target)
    valid: np.ndarray  # validation targets (-1: none)
    test: np.ndarray  # test targets (-1: none)

    @property
    def num_items(self) -> int:
        return len(self.catalog)

    @property
    def test_histories(self) -> list[np.ndarray]:
        """Everything before each user's test target (train + validation)."""
        return [s if v >= 0 else s[:0] for s, v in zip(self.valid_seqs, self.valid, strict=True)]


def load_split(data: Path) -> Split:
    catalog = load_catalog(data)
    train, valid, test = leave_one_out(load_interactions(data, catalog))
    valid_seqs = [np.append(t, v) if v >= 0 else t for t, v in zip(train, valid, strict=True)]
    return Split(catalog, train, valid_seqs, valid, test)


# -- recall coverage ----------------------------------------------------------
def _recency_weights(lengths: Sequence[int], decay: float) -> list[np.ndarray]:
    return [decay ** np.arange(n - 1, -1, -1, dtype=np.float64) for n in lengths]


def recall_coverage(
    item_vectors: np.ndarray,
    cooc: CoocModel,
    histories: Sequence[np.ndarray],
    targets: np.ndarray,
    ks: Sequence[int] = RECALL_KS,
    *,
    decay: float = 0.8,
    last_n: int = 20,
    neighbours: int = 200,
    batch_size: int = 1024,
    progress: bool = False,
) -> dict[str, float]:
    """Share of test targets kept in the top K of each recall source.

    * ``vector``: recency-weighted (``decay**age``) mean of the last ``last_n``
      history items' vectors, dot product against every item.
    * ``cooc``: the ``neighbours``-per-item co-occurrence table, aggregated over
      the recent history (items with no evidence are not retrieved).
    * ``union``: both top-K lists together (up to 2K candidates).
    * ``merged``: a K budget, half from co-occurrence, filled up from the vector.

    History items are excluded everywhere (except the target), as in ranking.
    """
    vectors = torch.from_numpy(np.asarray(item_vectors, dtype=np.float32))  # [n, D] by row
    table = neighbour_table_scores(*cooc.topk(neighbours), cooc.num_items)
    users = np.flatnonzero(np.asarray(targets) >= 0)
    kmax = max(ks)
    hits: dict[str, float] = {}
    sizes: dict[int, float] = dict.fromkeys(ks, 0.0)
    for start in tqdm(range(0, len(users), batch_size), disable=not progress, desc="recall"):
        batch = users[start : start + batch_size]
        hist = [np.asarray(histories[u], dtype=np.int64)[-last_n:] for u in batch]
        full_hist = [np.asarray(histories[u], dtype=np.int64) for u in batch]
        tgt = torch.from_numpy(np.asarray(targets)[batch].astype(np.int64))
        weights = _recency_weights([len(h) for h in hist], decay)
        user = torch.stack(
            [
                (torch.from_numpy(w).float().unsqueeze(1) * vectors[torch.from_numpy(h)]).sum(0)
                / max(float(w.sum()), 1e-9)
                for h, w in zip(hist, weights, strict=True)
            ]
        )
        vec_scores = mask_history(user @ vectors.T, full_hist, tgt)
        vec_top = vec_scores.topk(kmax, dim=1).indices
        co = torch.from_numpy(
            (cooc.user_matrix(hist, last_n=last_n, decay=decay) @ table).toarray()
        ).float()
        co = mask_history(co, full_hist, tgt)
        co[co <= 0] = float("-inf")  # no evidence: not retrieved
        co_val, co_top = co.topk(kmax, dim=1)
        co_top[~torch.isfinite(co_val)] = -1
        t = tgt.unsqueeze(1)
        for k in ks:
            v_hit = (vec_top[:, :k] == t).any(1)
            c_hit = (co_top[:, :k] == t).any(1)
            half = co_top[:, : k // 2]
            n_co = (half >= 0).sum(1)
            merged_hit = (half == t).any(1)
            # otherwise the target must survive in the vector list after dropping duplicates
            in_vec = vec_top == t
            for i in torch.nonzero(~merged_hit & in_vec.any(1)).flatten().tolist():
                pos = int(in_vec[i].nonzero()[0, 0])
                dup = np.isin(vec_top[i, :pos].numpy(), half[i, : int(n_co[i])].numpy()).sum()
                merged_hit[i] = pos - int(dup) < k - int(n_co[i])
            union = torch.cat([vec_top[:, :k], co_top[:, :k]], 1).sort(dim=1).values
            dup = (union[:, 1:] == union[:, :-1]) & (union[:, 1:] >= 0)
            sizes[k] += float((union >= 0).sum() - dup.sum())
            for name, hit in (
                ("vector", v_hit),
                ("cooc", c_hit),
                ("union", v_hit | c_hit),
                ("merged", merged_hit),
            ):
                key = f"{name}@{k}"
                hits[key] = hits.get(key, 0.0) + float(hit.sum())
    n = max(len(users), 1)
    out = {key: value / n for key, value in hits.items()}
    for k in ks:
        out[f"union_size@{k}"] = sizes[k] / n
    return out


# -- the report -----------------------------------------------------------------
def _row(name: str, metrics: dict[str, float], seconds: float | None) -> str:
    cells = [f"{metrics[f'HR@{k}']:.4f}" for k in KS] + [f"{metrics[f'NDCG@{k}']:.4f}" for k in KS]
    train_s = "-" if seconds is None else f"{seconds:.0f}"
    return f"| {name} | " + " | ".join(cells) + f" | {train_s} |"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--epochs", type=int, default=200, help="upper bound; early stopping")
    parser.add_argument(
        "--time-budget",
        type=float,
        default=1100.0,
        help="training seconds per neural model, under the 20-minute cap even on a loaded "
        "machine (0: none, for reproducible epoch counts)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=RankerConfig.num_threads)
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--skip-sasrec", action="store_true", help="skip the ids-only model")
    parser.add_argument("--save", type=Path, help="write the trained fine ranker here")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    progress = not args.no_progress
    torch.set_num_threads(args.threads)

    split = load_split(args.data)
    n = split.num_items
    hist, test = split.test_histories, split.test
    rows: list[str] = []

    def run(
        name: str, fn: ScoreFn, seconds: float | None, extras: np.ndarray | None = None
    ) -> None:
        metrics = evaluate(fn, hist, test, progress=progress, desc=name, extras=extras)
        rows.append(_row(name, metrics, seconds))

    for label, seqs in (("train", split.train), ("train+valid", split.valid_seqs)):
        t0 = time.perf_counter()
        pop = PopularityModel.fit(seqs, n)
        run(f"popularity ({label} counts)", pop.scores, time.perf_counter() - t0)
    t0 = time.perf_counter()
    cooc = CoocModel.fit(split.train, n)
    run(f"co-occurrence (window {COOC_WINDOW})", cooc.scores, time.perf_counter() - t0)

    text = text_table(split.catalog, args.cache_dir, progress)
    queries = pseudo_query_table(split.catalog, 2, args.seed, args.cache_dir, progress)
    test_queries = pseudo_query_table(split.catalog, 1, args.seed + 1, args.cache_dir, progress)

    def train(use_text: bool) -> tuple[FineRanker, float]:
        cfg = RankerConfig(use_text=use_text, num_threads=args.threads)
        t0 = time.perf_counter()
        model = train_ranker(
            split.train,
            n,
            text if use_text else None,
            cfg,
            epochs=args.epochs,
            seed=args.seed,
            valid_sequences=split.valid_seqs,
            progress=progress,
            time_budget_s=args.time_budget or None,
            pseudo_queries=queries if use_text else None,
        )
        return model, time.perf_counter() - t0

    notes: list[str] = []
    if not args.skip_sasrec:
        sasrec, seconds = train(use_text=False)
        run("SASRec (FineRanker, ids only)", partial(full_scores, sasrec), seconds)
        notes.append(f"SASRec: {sasrec.train_info}")
    ranker, seconds = train(use_text=True)
    run("fine ranker (ids + text)", partial(full_scores, ranker), seconds)
    notes.append(f"fine ranker: {ranker.train_info}")
    if args.save:
        ranker.save(args.save)
    # search sanity check: a held-out pseudo-query (title words of the target) plus the history
    user_q = np.zeros((len(test), text.shape[1]), dtype=np.float32)
    has = test >= 0
    user_q[has] = test_queries[test[has] + 1, 0]
    run("fine ranker + pseudo-query (search)", partial(full_scores, ranker), None, extras=user_q)
    titles = torch.from_numpy(text[1:])
    run(
        "  reference: cosine(pseudo-query, title) only",
        lambda h, q: torch.from_numpy(q) @ titles.T,
        None,
        extras=user_q,
    )

    print(f"\n{args.data.name}: {len(hist)} users, {n} items, {int(has.sum())} test targets")
    print("| model | HR@10 | HR@20 | HR@50 | NDCG@10 | NDCG@20 | NDCG@50 | train s |")
    print("|" + "---|" * 8)
    print("\n".join(rows))
    print("\n".join(notes))

    with torch.inference_mode():
        vectors = ranker.all_item_vectors()[1:].numpy()
    cov = recall_coverage(vectors, cooc, hist, test, progress=progress)
    print("\nrecall: share of test targets kept (history excluded)")
    print("| source | @200 | @1000 |")
    print("|---|---|---|")
    for name, label in (
        ("vector", "user vector (recency-weighted mean of item_vectors)"),
        ("cooc", "co-occurrence (200 neighbours per item)"),
        ("union", "union of both lists (up to 2K)"),
        ("merged", "merged K budget (half co-occurrence, rest vector)"),
    ):
        print(f"| {label} | {cov[f'{name}@200']:.4f} | {cov[f'{name}@1000']:.4f} |")
    print(f"mean union size: @200 {cov['union_size@200']:.0f}, @1000 {cov['union_size@1000']:.0f}")


if __name__ == "__main__":
    main()
