"""The hot path's vectorized steps against plain-Python references of the same rules.

Each step was rewritten for speed (issue 12: no per-candidate Python work, nothing that
touches every catalog row). These properties hold the rewrites to the rules they replace, on
inputs hypothesis generates: duplicates, empty lists, budgets larger than what the sources
have, and columns outside the seeds' rows.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import sparse

from sluice.artifacts import Artifacts
from sluice.coarse.engine import weighted_row_sum
from sluice.data.catalog import Catalog
from sluice.domain import RRF_K, Candidates, RankContext, Source
from sluice.kernels import merge_lists, mmr_order, postings_at, postings_top, rows_dot
from sluice.recall.sources import merge
from sluice.rerank.engine import RerankConfig, RerankEngine, title_key
from sluice.rerank.exposure import fair_minimums

N_ROWS = 60


def bincount_row_sum(
    matrix: sparse.csr_matrix, seeds: np.ndarray, weights: np.ndarray, columns: np.ndarray
) -> np.ndarray:
    """The numpy version the compiled kernel replaced: products of the seeds' entries in the
    matrix's dtype, summed in float64 per column by ``np.bincount`` in entry order."""
    entries = [np.arange(matrix.indptr[s], matrix.indptr[s + 1]) for s in seeds]
    entry = np.concatenate(entries) if entries else np.zeros(0, np.int64)
    lengths = [len(e) for e in entries]
    values = matrix.data[entry] * np.repeat(np.asarray(weights, np.float32), lengths)
    sums = np.bincount(matrix.indices[entry], weights=values, minlength=matrix.shape[1])
    return sums[columns].astype(np.float32)


@settings(max_examples=200, deadline=None)
@given(
    seed=st.integers(0, 2**31),
    density=st.floats(0.0, 0.5),
    n_seeds=st.integers(0, 25),
    n_columns=st.integers(0, 80),
    dtype=st.sampled_from([np.float32, np.float64]),  # served / the build's fitting view
)
def test_weighted_row_sum_is_the_dense_product(
    seed: int, density: float, n_seeds: int, n_columns: int, dtype: type
) -> None:
    rng = np.random.default_rng(seed)
    matrix = sparse.random(
        N_ROWS, N_ROWS, density=density, format="csr", random_state=seed, dtype=dtype
    )
    seeds = rng.integers(0, N_ROWS, n_seeds)  # a history may hold an item twice
    weights = rng.random(n_seeds).astype(np.float32)
    columns = rng.integers(0, N_ROWS, n_columns)  # candidates may repeat a row (unknown ids)
    dense = matrix.toarray()
    expected = (weights @ dense[seeds])[columns] if n_seeds else np.zeros(n_columns)
    got = weighted_row_sum(matrix, seeds, weights, columns)
    assert got.dtype == np.float32 and got.shape == (n_columns,)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    # the compiled kernel adds in the order numpy's bincount did, so the coarse features do
    # not move at all; and again, because its scratch row must be left zeroed
    bits = bincount_row_sum(matrix, seeds, weights, columns)
    np.testing.assert_array_equal(got, bits)
    np.testing.assert_array_equal(weighted_row_sum(matrix, seeds, weights, columns), bits)


def test_weighted_row_sum_refuses_rows_outside_the_matrix() -> None:
    matrix = sparse.identity(5, dtype=np.float32, format="csr")
    one = np.ones(1, np.float32)
    with pytest.raises(IndexError):
        weighted_row_sum(matrix, np.array([5]), one, np.array([0]))
    with pytest.raises(IndexError):
        weighted_row_sum(matrix, np.array([0]), one, np.array([-1]))


@settings(max_examples=100, deadline=None)
@given(
    seed=st.integers(0, 2**31),
    n_rows=st.integers(0, 50),
    width=st.integers(1, 70),
    n_vectors=st.integers(1, 3),
)
def test_rows_dot_is_the_gathered_product(
    seed: int, n_rows: int, width: int, n_vectors: int
) -> None:
    rng = np.random.default_rng(seed)
    table = rng.standard_normal((N_ROWS, width)).astype(np.float32)
    rows = rng.integers(0, N_ROWS, n_rows)  # repeats allowed
    vectors = rng.standard_normal((n_vectors, width)).astype(np.float32)
    got = rows_dot(table, rows, vectors)
    assert got.dtype == np.float32 and got.shape == (n_rows, n_vectors)
    np.testing.assert_allclose(got, table[rows] @ vectors.T, rtol=1e-5, atol=1e-5)
    # one vector (1-d) gives one column; a float64 table takes numpy's path, same result
    np.testing.assert_allclose(rows_dot(table, rows, vectors[0])[:, 0], got[:, 0], rtol=1e-6)
    wide = table.astype(np.float64)
    np.testing.assert_allclose(rows_dot(wide, rows, vectors), got, rtol=1e-5, atol=1e-5)


def test_rows_dot_refuses_a_row_outside_the_table_or_a_vector_of_another_width() -> None:
    table = np.ones((4, 3), np.float32)
    with pytest.raises(IndexError):
        rows_dot(table, np.array([4]), np.ones(3, np.float32))
    with pytest.raises(ValueError, match="width"):
        rows_dot(table, np.array([0]), np.ones(5, np.float32))


def reference_top_positive(scores: np.ndarray, k: int) -> list[int]:
    """Rows with a positive score, by score then row, the first ``k``."""
    positive = [r for r in range(len(scores)) if scores[r] > 0]
    return sorted(positive, key=lambda r: (-float(scores[r]), r))[: max(k, 0)]


def random_postings(
    rng: np.random.Generator, n_terms: int, n_rows: int, levels: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A term-by-row CSR as bm25s stores its scores; few distinct values make equal sums
    (ties at the cut) common."""
    dense = rng.integers(0, levels + 1, (n_terms, n_rows)) * np.float32(0.25)
    dense[rng.random(dense.shape) < 0.6] = 0
    m = sparse.csr_matrix(dense.astype(np.float32))
    return m.indptr.astype(np.int64), m.indices.astype(np.int32), m.data


def added_in_order(
    postings: tuple[np.ndarray, np.ndarray, np.ndarray],
    terms: np.ndarray,
    n_rows: int,
    extra: tuple[np.ndarray, np.ndarray],
) -> np.ndarray:
    """What bm25s computes: every row's float32 sum, term by term with ``np.add.at``, then
    the live documents' scores."""
    indptr, indices, data = postings
    scores = np.zeros(n_rows, np.float32)
    for t in terms:
        np.add.at(scores, indices[indptr[t] : indptr[t + 1]], data[indptr[t] : indptr[t + 1]])
    np.add.at(scores, *extra)
    return scores


@settings(max_examples=200, deadline=None)
@given(
    seed=st.integers(0, 2**31),
    n_terms=st.integers(1, 8),
    n_rows=st.integers(1, 120),
    query=st.lists(st.integers(0, 7), max_size=6),  # terms may repeat, as query words do
    levels=st.integers(1, 5),
    k=st.integers(-1, 130),
    masked=st.booleans(),
    n_extra=st.integers(0, 10),
)
def test_postings_kernels_are_the_whole_score_array_read_as_before(
    seed: int,
    n_terms: int,
    n_rows: int,
    query: list[int],
    levels: int,
    k: int,
    masked: bool,
    n_extra: int,
) -> None:
    """``postings_at`` gives ``scores[rows]`` and ``scores.max()`` to the bit, and
    ``postings_top`` the rows a scan of every row gives: positive and allowed, best first,
    equal scores in row order, also at the cut."""
    rng = np.random.default_rng(seed)
    postings = random_postings(rng, n_terms, n_rows, levels)
    terms = np.array([t for t in query if t < n_terms], np.int64)
    extra = (rng.integers(0, n_rows, n_extra), rng.integers(-2, 3, n_extra) * np.float32(0.5))
    allowed = rng.random(n_rows) < 0.7 if masked else None
    scores = added_in_order(postings, terms, n_rows, extra)
    rows = rng.integers(0, n_rows, 50)
    for _ in range(2):  # again: the per-thread scratch row must be left zeroed
        at, top = postings_at(postings, terms, rows, n_rows, extra)
        assert at.dtype == np.float32
        np.testing.assert_array_equal(at, scores[rows])
        assert top == max(0.0, float(scores.max()))
        best, values = postings_top(postings, terms, k, n_rows, allowed, extra)
        assert best.dtype == np.int64
        seen = scores if allowed is None else np.where(allowed, scores, 0)
        assert best.tolist() == reference_top_positive(seen, k)
        np.testing.assert_array_equal(values, scores[best])


def test_a_query_repeating_a_term_thousands_of_times_is_read_as_before() -> None:
    """A stranger's query may repeat one common word up to the length limit: each repeat is
    added again, as bm25s does, and the rows it reaches are listed once, not per repeat."""
    postings = random_postings(np.random.default_rng(1), 2, 50, 3)
    terms = np.array([0, 1] * 3000, np.int64)
    none = (np.zeros(0, np.int64), np.zeros(0, np.float32))
    scores = added_in_order(postings, terms, 50, none)
    at, top = postings_at(postings, terms, np.arange(50), 50)
    np.testing.assert_array_equal(at, scores)
    assert top == max(0.0, float(scores.max()))
    best, values = postings_top(postings, terms, 10, 50)
    assert best.tolist() == reference_top_positive(scores, 10)
    np.testing.assert_array_equal(values, scores[best])


def test_postings_kernels_refuse_rows_terms_and_masks_that_do_not_fit() -> None:
    postings = random_postings(np.random.default_rng(0), 3, 10, 2)
    with pytest.raises(IndexError):
        postings_at(postings, [0], np.array([10]), 10)
    with pytest.raises(IndexError, match="term"):
        postings_at(postings, [3], np.array([0]), 10)
    with pytest.raises(IndexError, match="extra"):
        postings_top(postings, [0], 5, 10, None, (np.array([-1]), np.array([1.0])))
    with pytest.raises(ValueError, match="mask"):
        postings_top(postings, [0], 5, 10, np.ones(9, bool))
    # nothing was added before the refusals: a query reads the clean sums
    at, _ = postings_at(postings, [1], np.arange(10), 10)
    clean = added_in_order(postings, np.array([1]), 10, (np.zeros(0, np.int64), np.zeros(0)))
    np.testing.assert_array_equal(at, clean)


def reference_merge(
    lists: dict[Source, tuple[np.ndarray, np.ndarray]],
    quotas: dict[Source, float],
    budget: int,
    item_ids: np.ndarray,
) -> list[tuple[int, float, int]]:
    """The merge rules in plain Python: quotas in order, leftovers round-robin, then RRF."""
    ordered = [s for s in quotas if s in lists] + [s for s in lists if s not in quotas]
    picked: list[tuple[int, int]] = []
    taken: set[int] = set()
    leftovers: list[tuple[Source, list[int]]] = []
    for source in ordered:
        fresh = [int(r) for r in lists[source][0] if int(r) not in taken]
        take = min(round(quotas.get(source, 0.0) * budget), budget - len(taken), len(fresh))
        picked += [(r, int(source)) for r in fresh[:take]]
        taken.update(fresh[:take])
        leftovers.append((source, fresh[take:]))
    longest = max((len(rest) for _, rest in leftovers), default=0)
    for i in range(longest):
        for source, rest in leftovers:
            if len(taken) < budget and i < len(rest) and rest[i] not in taken:
                picked.append((rest[i], int(source)))
                taken.add(rest[i])
    fused = dict.fromkeys(taken, 0.0)
    for rows, _ in lists.values():
        for rank, row in enumerate(rows.tolist()):
            if row in fused:
                fused[row] += 1.0 / (RRF_K + rank)
    order = sorted(range(len(picked)), key=lambda i: -fused[picked[i][0]])  # stable
    return [
        (int(item_ids[picked[i][0]]), float(np.float32(fused[picked[i][0]])), picked[i][1])
        for i in order
    ]


@settings(max_examples=200, deadline=None)
@given(
    seed=st.integers(0, 2**31),
    sizes=st.lists(st.integers(0, 40), min_size=1, max_size=3),
    budget=st.integers(1, 70),
    quota_share=st.floats(0.0, 1.0),
)
def test_merge_follows_the_reference_rules(
    seed: int, sizes: list[int], budget: int, quota_share: float
) -> None:
    rng = np.random.default_rng(seed)
    sources = [Source.ANN, Source.CO_OCCURRENCE, Source.POPULARITY][: len(sizes)]
    lists = {  # each source's rows are distinct, best first; sources overlap
        s: (rng.permutation(N_ROWS)[:n].astype(np.int64), np.zeros(n, np.float32))
        for s, n in zip(sources, sizes, strict=True)
    }
    quotas = {s: quota_share / len(sources) for s in sources[:-1]}  # the last has no quota
    item_ids = np.arange(1000, 1000 + N_ROWS, dtype=np.int64)
    got = merge(lists, quotas, budget, item_ids)
    expected = reference_merge(lists, quotas, budget, item_ids)
    assert got.item_ids.tolist() == [e[0] for e in expected]
    assert got.sources.tolist() == [e[2] for e in expected]
    # the same sums in the same order (lists, then ranks): the same bits
    assert got.scores.tolist() == [e[1] for e in expected]


def test_merge_lists_refuses_a_row_outside_the_catalog_and_leaves_the_scratch_clean() -> None:
    for bad in (-1, N_ROWS):
        with pytest.raises(IndexError):
            merge_lists([np.array([0, bad])], [2], [1], [0], 2, RRF_K, N_ROWS)
    with pytest.raises(ValueError, match="quota"):
        merge_lists([np.array([0, 1])], [-1], [1], [0], 2, RRF_K, N_ROWS)
    rows, codes, fused = merge_lists(
        [np.array([3, 1]), np.array([1, 2])], [1, 1], [1, 2], [0, 1], 3, RRF_K, N_ROWS
    )
    assert rows.tolist() == [3, 1, 2] and codes.tolist() == [1, 2, 2]
    assert fused.tolist() == [1 / RRF_K, 1 / (RRF_K + 1) + 1 / RRF_K, 1 / (RRF_K + 1)]


def reference_dedupe(item_ids: list[int], titles: dict[int, str], keep: list[bool]) -> list[int]:
    """The rerank stage's dedupe: in relevance order, an item goes when its id or its
    title key was already kept."""
    seen_ids: set[int] = set()
    seen_keys: set[str] = set()
    out = []
    for item, ok in zip(item_ids, keep, strict=True):
        key = title_key(titles[item])
        if ok and item not in seen_ids and key not in seen_keys:
            out.append(item)
            seen_ids.add(item)
            seen_keys.add(key)
    return out


@settings(max_examples=200, deadline=None)
@given(seed=st.integers(0, 2**31), n=st.integers(0, 60))
def test_dedupe_follows_the_reference_rule(seed: int, n: int) -> None:
    rng = np.random.default_rng(seed)
    ids = list(range(100, 100 + N_ROWS))
    # few distinct products, in variants: many titles share a key
    titles = [f"Item {rng.integers(0, 12)} - {rng.choice(['Red', 'Blue'])}" for _ in ids]
    in_stock = (rng.random(N_ROWS) < 0.8).tolist()
    catalog = Catalog.from_columns(
        item_ids=ids,
        titles=titles,
        categories=["c"] * N_ROWS,
        brands=["b"] * N_ROWS,
        in_stock=in_stock,
    )
    vectors = np.eye(N_ROWS, 8, dtype=np.float32)
    engine = RerankEngine(catalog, vectors, RerankConfig(diversity_lambda=1.0, max_per_brand=0))
    chosen = rng.choice(ids, n).astype(np.int64)  # an id may come twice
    scores = np.sort(rng.random(n))[::-1].astype(np.float32)  # relevance order is input order
    cands = Candidates(chosen, scores, np.zeros(n, np.int8))
    got = engine._eligible(RankContext(), cands).item_ids.tolist()
    by_id = dict(zip(ids, titles, strict=True))
    stock = dict(zip(ids, in_stock, strict=True))
    assert got == reference_dedupe(chosen.tolist(), by_id, [stock[i] for i in chosen.tolist()])


def reference_mmr(
    rel: np.ndarray,
    vecs: np.ndarray,
    brands: np.ndarray,
    n_brands: int,
    needed: int,
    lam: float,
    cap: int,
    tail: np.ndarray | None = None,
    minimums: np.ndarray | None = None,
) -> list[int]:
    """Greedy MMR with a brand cap as first written: similarity to the closest chosen item
    (0 before the first pick), capped brands 10 lower, chosen items out; with an exposure
    target, a prefix short of its minimum takes the best tail item while any is left."""
    limit = len(rel)
    brand_count = np.zeros(n_brands, dtype=np.int64)
    chosen: list[int] = []
    max_sim = np.full(limit, -np.inf)
    free = np.ones(limit, dtype=bool)
    while len(chosen) < min(needed, limit) and free.any():
        sim_term = np.where(np.isfinite(max_sim), max_sim, 0.0)
        value = lam * rel - (1.0 - lam) * sim_term
        if cap:
            value = np.where(brand_count[brands] >= cap, value - 10.0, value)
        allowed = free
        if tail is not None and minimums is not None:
            short = int(tail[chosen].sum()) < minimums[len(chosen) + 1]
            if short and (free & tail).any():
                allowed = free & tail
        pick = int(np.argmax(np.where(allowed, value, -np.inf)))
        chosen.append(pick)
        free[pick] = False
        brand_count[brands[pick]] += 1
        max_sim = np.maximum(max_sim, vecs @ vecs[pick])
    return chosen + np.flatnonzero(free).tolist()


@settings(max_examples=200, deadline=None)
@given(
    seed=st.integers(0, 2**31),
    n=st.integers(1, N_ROWS),
    needed=st.integers(0, 30),
    lam=st.sampled_from([0.0, 0.5, 0.85, 1.0]),
    cap=st.integers(0, 4),
    ties=st.booleans(),
    tail_share=st.sampled_from([0.0, 0.3, 0.8]),
)
def test_mmr_follows_the_reference_rule(
    seed: int, n: int, needed: int, lam: float, cap: int, ties: bool, tail_share: float
) -> None:
    rng = np.random.default_rng(seed)
    ids = list(range(100, 100 + N_ROWS))
    brands = [f"b{rng.integers(0, 4)}" for _ in ids]
    catalog = Catalog.from_columns(
        item_ids=ids, titles=[f"t{i}" for i in ids], categories=["c"] * N_ROWS, brands=brands
    )
    vectors = rng.normal(size=(N_ROWS, 8)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    tail = rng.random(N_ROWS) < 0.3  # the long tail's rows, for an exposure target
    config = RerankConfig(diversity_lambda=lam, max_per_brand=cap, window=10, tail_share=tail_share)
    engine = RerankEngine(catalog, vectors, config, tail)
    chosen = rng.permutation(N_ROWS)[:n]
    scores = rng.integers(0, 3, n) if ties else rng.random(n)  # ties: argmax takes the first
    cands = Candidates(
        np.array(ids)[chosen], np.sort(scores.astype(np.float32))[::-1], np.zeros(n, np.int8)
    )
    got = engine._mmr(cands, needed, config).item_ids.tolist()
    limit = min(n, needed + config.window)
    rel = cands.scores[:limit].astype(np.float64)
    span = rel.max() - rel.min()
    rel = (rel - rel.min()) / span if span > 0 else np.ones_like(rel)
    rows = chosen[:limit]
    minimums = fair_minimums(min(needed, limit), tail_share, config.tail_alpha)
    order = reference_mmr(
        rel,
        vectors[rows],
        catalog.brand_codes[rows],
        len(catalog.brands),
        needed,
        lam,
        cap,
        tail[rows] if tail_share else None,
        minimums if tail_share else None,
    )
    expected = [ids[rows[i]] for i in order] + [ids[r] for r in chosen[limit:]]
    assert got == expected


def test_mmr_order_refuses_a_row_outside_the_table_or_a_short_exposure_target() -> None:
    table = np.eye(4, dtype=np.float32)
    relevance, brands = np.ones(3), np.zeros(3, np.int64)
    with pytest.raises(IndexError):
        mmr_order(relevance, table, np.array([0, 1, 4]), brands, lam=0.5, cap=0, target=3)
    rows = np.array([0, 1, 2])
    with pytest.raises(ValueError, match="exposure"):  # a minimum for prefixes 0 .. 3 needed
        mmr_order(
            relevance,
            table,
            rows,
            brands,
            lam=0.5,
            cap=0,
            target=3,
            tail=np.ones(3, bool),
            minimums=np.zeros(3, np.int64),
        )
    # a float64 table is read through a float32 copy of the rows, not refused
    picks = mmr_order(
        np.array([0.0, 1.0, 0.5]), table.astype(np.float64), rows, brands, lam=0.5, cap=0, target=5
    )
    assert picks.tolist() == [1, 2, 0]


def test_the_pages_benchmark_finds_a_changed_page(
    tmp_path: Path, tiny_artifacts: Artifacts
) -> None:
    """``sluice.bench.hotpath pages``, the check behind "identical pages" claims: the same
    code gives the same pages, and one changed score is found; so are a page whose ids
    changed order and a page that lost an id, which is what an approximate change shows."""
    from sluice.bench.hotpath import main

    file = tmp_path / "pages.json"
    args = ["pages", str(tiny_artifacts.root), str(file), "--requests", "20"]
    assert main(args) == 0 and len(json.loads(file.read_text())) == 20
    out = tmp_path / "out.json"

    def compared() -> dict[str, float]:
        main([*args, "--json", str(out)])
        return dict(json.loads(out.read_text()))

    assert compared() == {"identical": 20, "same_ids": 20, "overlap": 1.0, "pages": 20}
    pages = json.loads(file.read_text())
    full = [p for p in pages if len(p["ids"]) >= 2]
    full[0]["scores"][0] += 0.001
    file.write_text(json.dumps(pages))
    assert compared() == {"identical": 19, "same_ids": 20, "overlap": 1.0, "pages": 20}
    full[1]["ids"][:2] = full[1]["ids"][1::-1]  # the same ids, two swapped
    file.write_text(json.dumps(pages))
    assert compared() == {"identical": 18, "same_ids": 19, "overlap": 1.0, "pages": 20}
    full[2]["ids"][0] = "not-an-item"
    file.write_text(json.dumps(pages))
    got = compared()
    kept = 1 - 1 / (20 * len(full[2]["ids"]))
    assert (got["identical"], got["same_ids"]) == (17, 18)
    assert got["overlap"] == pytest.approx(kept)
