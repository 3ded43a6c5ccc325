"""The fine ranker's sampled softmax: exactness, logQ correction, accidental hits, learning."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch

from sluice.data.synthetic import ShopSpec, generate_shop
from sluice.eval.baselines import PopularityModel
from sluice.eval.metrics import evaluate
from sluice.eval.offline import pseudo_query_table, text_table
from sluice.fine.model import FineRanker, RankerConfig, pad_histories
from sluice.fine.train import (
    CandidateSampler,
    _query_batch,
    _windows,
    corrected_softmax_loss,
    full_loss,
    full_scores,
    sampled_loss,
    target_counts,
    train_ranker,
)

ROOT = Path(__file__).resolve().parents[2]
CACHE = ROOT / "var" / "cache"  # the text tables the other tests' tiny shop caches too
NUM_ITEMS = 60
TEXT_DIM = 384


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _unit_rows(shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    table = rng.normal(size=shape).astype(np.float32)
    return table / np.linalg.norm(table, axis=-1, keepdims=True)


def _batch(
    cfg: RankerConfig, seed: int = 0
) -> tuple[FineRanker, list[np.ndarray], torch.Tensor, torch.Tensor, torch.Tensor]:
    """A small model (dropout off) and one training batch of random sequences."""
    rng = np.random.default_rng(seed)
    text = _unit_rows((NUM_ITEMS + 1, TEXT_DIM), rng)
    text[0] = 0.0
    torch.manual_seed(seed)
    model = FineRanker(NUM_ITEMS, text, cfg).eval()
    # popular items are more frequent, as in a shop
    weights = 1.0 / np.arange(1, NUM_ITEMS + 1)
    sequences = [
        rng.choice(NUM_ITEMS, size=int(rng.integers(2, 14)), p=weights / weights.sum())
        for _ in range(24)
    ]
    windows = _windows(sequences, cfg.max_len)
    seqs = pad_histories(windows, cfg.max_len + 1)
    inputs, targets = seqs[:, :-1], seqs[:, 1:]
    targets = torch.where(inputs > 0, targets, torch.zeros_like(targets))
    pq = torch.from_numpy(_unit_rows((NUM_ITEMS + 1, 2, TEXT_DIM), rng))
    return model, windows, inputs, targets, pq


@pytest.mark.parametrize("kind", ["uniform", "log_uniform"])
@pytest.mark.parametrize("with_query", [False, True])
def test_every_item_once_without_in_batch_is_the_full_softmax(kind: str, with_query: bool) -> None:
    """Asking for every item as a negative makes the sampled loss, and its gradient, exact."""
    cfg = RankerConfig(
        dim=32,
        max_len=8,
        loss="sampled",
        sampler=kind,
        num_negatives=NUM_ITEMS,
        in_batch_negatives=False,
    )
    model, windows, inputs, targets, pq = _batch(cfg)
    sampler = CandidateSampler(target_counts(windows, NUM_ITEMS), NUM_ITEMS, kind, in_batch=False)
    q_emb, q_mask = _query_batch(targets, pq if with_query else None, 0.5)
    if with_query:
        assert q_mask is not None and bool(q_mask.any())

    def loss_and_grads(sampled: bool) -> tuple[float, list[torch.Tensor]]:
        model.zero_grad()
        if sampled:
            loss = sampled_loss(model, inputs, targets, q_emb, q_mask, sampler)
        else:
            loss = full_loss(model, inputs, targets, q_emb, q_mask)
        loss.backward()
        grads = [
            torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in model.parameters()
        ]
        return float(loss.detach()), grads

    full, full_grads = loss_and_grads(sampled=False)
    sampled, sampled_grads = loss_and_grads(sampled=True)
    assert sampled == pytest.approx(full, rel=1e-5)
    for a, b in zip(sampled_grads, full_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_repeated_draws_count_like_repeated_columns(monkeypatch: pytest.MonkeyPatch) -> None:
    """An item drawn ``c`` times is one column corrected by ``+ log c``: the same loss as
    the ``c`` equal columns of the drawn multiset (the Monte Carlo estimate as drawn)."""
    cfg = RankerConfig(dim=32, max_len=8, loss="sampled", sampler="log_uniform")
    model, windows, inputs, targets, _ = _batch(cfg)
    counts = target_counts(windows, NUM_ITEMS)
    sampler = CandidateSampler(counts, 40, "log_uniform", in_batch=True)
    assert not sampler.every_item
    torch.manual_seed(3)
    draw = sampler.sample()
    assert len(torch.unique(draw)) < len(draw)  # popular items come up more than once
    monkeypatch.setattr(sampler, "sample", lambda: draw)
    with torch.no_grad():
        got = float(sampled_loss(model, inputs, targets, None, None, sampler))
        # the multiset: every in-batch target and every draw is a column of its own
        is_target = targets > 0
        labels = targets[is_target]
        columns = torch.cat([labels, draw])
        hidden = model._hidden(inputs, None, None)[is_target]
        vectors = model.all_item_vectors()
        want = corrected_softmax_loss(
            (hidden * vectors[labels]).sum(-1),
            hidden @ vectors[columns].T,
            labels,
            columns,
            sampler.log_expected_count(labels, len(labels)),
            sampler.log_expected_count(columns, len(labels)),
        )
    assert got == pytest.approx(float(want), rel=1e-5)


def test_the_loss_with_sampled_negatives_differs_from_the_full_softmax() -> None:
    """The exactness above is not vacuous: fewer negatives give another (smaller) loss."""
    cfg = RankerConfig(dim=32, max_len=8, loss="sampled", num_negatives=8)
    model, windows, inputs, targets, _ = _batch(cfg)
    counts = target_counts(windows, NUM_ITEMS)
    with torch.no_grad():
        full = float(full_loss(model, inputs, targets, None, None))
        for in_batch in (False, True):
            sampler = CandidateSampler(counts, 8, "log_uniform", in_batch=in_batch)
            torch.manual_seed(1)
            sampled = float(sampled_loss(model, inputs, targets, None, None, sampler))
            assert np.isfinite(sampled)
            assert sampled != pytest.approx(full, rel=1e-3)


def _softmax_ce(pos: float, negatives: list[float]) -> float:
    logits = np.array([pos, *negatives], dtype=np.float64)
    return float(np.log(np.exp(logits - logits.max()).sum()) + logits.max() - pos)


def test_accidental_hits_are_masked() -> None:
    """A shared candidate equal to the row's own target does not count as a negative."""
    positive = torch.tensor([2.0, 0.5])
    shared = torch.tensor([[1.0, 3.0, -1.0], [0.2, 0.4, 5.0]])
    row_ids = torch.tensor([7, 9])
    shared_ids = torch.tensor([4, 7, 9])  # row 0 hits column 1, row 1 hits column 2
    log_q_pos = torch.tensor([0.1, -0.3])
    log_q_shared = torch.tensor([0.5, 0.0, 0.2])
    loss = float(
        corrected_softmax_loss(positive, shared, row_ids, shared_ids, log_q_pos, log_q_shared)
    )
    row0 = _softmax_ce(2.0 - 0.1, [1.0 - 0.5, -1.0 - 0.2])
    row1 = _softmax_ce(0.5 + 0.3, [0.2 - 0.5, 0.4 - 0.0])
    assert loss == pytest.approx((row0 + row1) / 2, rel=1e-6)
    # the masked logits can be anything: the loss does not change, and gets no gradient
    shared2 = shared.clone()
    shared2[0, 1], shared2[1, 2] = 100.0, -100.0
    shared2.requires_grad_(True)
    loss2 = corrected_softmax_loss(positive, shared2, row_ids, shared_ids, log_q_pos, log_q_shared)
    assert float(loss2.detach()) == pytest.approx(loss, rel=1e-6)
    loss2.backward()
    assert shared2.grad is not None
    assert float(shared2.grad[0, 1]) == 0.0
    assert float(shared2.grad[1, 2]) == 0.0
    assert float(shared2.grad[0, 0]) != 0.0


@pytest.mark.parametrize(("kind", "in_batch"), [("log_uniform", True), ("uniform", False)])
def test_log_q_correction_makes_the_partition_estimate_unbiased(kind: str, in_batch: bool) -> None:
    """Sum of exp(logit - log E[count]) over the shared candidates estimates sum of exp(logit).

    The shared candidates are ``rows`` in-batch targets drawn from the training unigram and
    the sampler's negatives; a wrong correction (a missing count, the wrong proposal) is off
    by far more than the Monte Carlo error allowed here.
    """
    rng = np.random.default_rng(0)
    n, rows, k = 500, 64, 128
    counts = np.zeros(n + 1, dtype=np.int64)
    counts[1:] = rng.zipf(1.3, size=n).clip(max=10_000)  # heavy-tailed popularity
    sampler = CandidateSampler(counts, k, kind, in_batch=in_batch)
    assert float(sampler.proposal.sum()) == pytest.approx(1.0, rel=1e-9)
    if kind == "log_uniform":  # the most popular item is the likeliest negative
        assert int(sampler.proposal.argmax()) == int(np.argmax(counts))
    # logits that favour popular items, as a trained model's do
    logits = torch.from_numpy(0.5 * np.log1p(counts) + rng.normal(scale=0.5, size=n + 1))
    logits[0] = float("-inf")
    exact = float(torch.exp(logits[1:]).sum())
    torch.manual_seed(0)
    estimates = []
    for _ in range(2000):
        parts = [sampler.sample()]
        if in_batch:
            parts.append(torch.multinomial(sampler.unigram, rows, replacement=True))
        ids = torch.cat(parts)
        corrected = logits[ids] - sampler.log_expected_count(ids, rows).double()
        estimates.append(float(torch.exp(corrected).sum()))
    mean = float(np.mean(estimates))
    stderr = float(np.std(estimates) / np.sqrt(len(estimates)))
    assert abs(mean - exact) < max(4 * stderr, 0.01 * exact)
    assert stderr < 0.02 * exact  # the check above is tight enough to catch a wrong log Q


def test_config_round_trip_and_old_configs() -> None:
    cfg = RankerConfig(
        loss="sampled", num_negatives=4096, sampler="uniform", in_batch_negatives=False
    )
    back = RankerConfig.from_json(cfg.to_json())
    assert back == cfg
    assert asdict(back)["loss"] == "sampled"
    # a config saved before these fields existed (and one with a key from the future)
    old = json.loads(RankerConfig().to_json())
    for key in ("loss", "num_negatives", "sampler", "in_batch_negatives"):
        del old[key]
    old["some_future_field"] = 1
    loaded = RankerConfig.from_json(json.dumps(old))
    assert loaded.loss == "full"
    assert loaded == RankerConfig()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"loss": "softmax"}, "loss"),
        ({"sampler": "zipf"}, "sampler"),
        ({"num_negatives": -1}, "num_negatives"),
        ({"loss": "sampled", "num_negatives": 0, "in_batch_negatives": False}, "num_negatives"),
        ({"loss": "sampled", "label_smoothing": 0.1}, "label_smoothing"),
    ],
)
def test_bad_training_settings_are_refused(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RankerConfig(**overrides)  # type: ignore[arg-type]


def test_saved_model_keeps_the_training_settings(tmp_path: Path) -> None:
    cfg = RankerConfig(dim=32, max_len=8, loss="sampled", num_negatives=16, sampler="uniform")
    model, *_ = _batch(cfg)
    model.save(tmp_path)
    loaded = FineRanker.load(tmp_path)
    assert loaded.cfg == cfg


def test_sampled_training_learns_the_generated_shop() -> None:
    """Sampled-softmax training beats popularity clearly and nears the full softmax."""
    catalog, interactions = generate_shop(
        ShopSpec(num_items=800, num_users=600, mean_events_per_user=12, seed=3)
    )
    sequences = interactions.sequences()
    valid = [s for s in sequences if len(s) >= 3]
    train = [s[:-1] for s in sequences]
    table = text_table(catalog, cache_dir=CACHE, progress=False)
    pseudo = pseudo_query_table(catalog, per_item=2, seed=0, cache_dir=CACHE, progress=False)

    def trained(**overrides: object) -> FineRanker:
        cfg = RankerConfig(dim=64, num_threads=1, **overrides)  # type: ignore[arg-type]
        return train_ranker(
            train,
            len(catalog),
            table,
            cfg,
            epochs=8,
            seed=0,
            valid_sequences=valid,
            progress=False,
            pseudo_queries=pseudo,
        )

    # 128 shared negatives of 800 items: really sampled, not the whole catalog
    model = trained(loss="sampled", num_negatives=128, sampler="log_uniform")
    full = trained(loss="full")
    hist = [np.asarray(s[:-1]) for s in valid]
    tgt = np.array([s[-1] for s in valid], dtype=np.int64)
    ranker = evaluate(lambda h: full_scores(model, h), hist, tgt, ks=(10,))
    popular = evaluate(PopularityModel.fit(train, len(catalog)).scores, hist, tgt, ks=(10,))
    assert ranker["NDCG@10"] == pytest.approx(model.train_info["best_val_ndcg10"], rel=1e-6)
    assert model.train_info["best_val_hr10"] == pytest.approx(ranker["HR@10"], rel=1e-6)
    assert ranker["NDCG@10"] > 1.4 * popular["NDCG@10"]
    assert ranker["NDCG@10"] > 0.9 * full.train_info["best_val_ndcg10"]
    assert 0 < model.train_info["train_seconds"] <= model.train_info["seconds"]


def _run(label: str, loss: str, ndcgs: list[float], epoch_s: float) -> dict[str, object]:
    best = max(range(len(ndcgs)), key=lambda i: ndcgs[i])
    return {
        "label": label,
        "config": {"loss": loss},
        "val_ndcg10": ndcgs[best],
        "val_hr10": 2 * ndcgs[best],
        "train_s": epoch_s * len(ndcgs),
        "train_s_to_best": epoch_s * (best + 1),
        "epoch_s": epoch_s,
        "epochs": len(ndcgs),
        "best_epoch": best + 1,
        "history": [{"epoch_s": epoch_s, "val_ndcg10": v} for v in ndcgs],
    }


def test_softmax_bench_ratios_and_time_to_98_percent() -> None:
    from sluice.bench.softmax import compare, table_markdown

    full = _run("full", "full", [0.10, 0.20, 0.19], epoch_s=100.0)
    quick = _run("sampled(a)", "sampled", [0.150, 0.197, 0.199, 0.198], epoch_s=10.0)
    weak = _run("sampled(b)", "sampled", [0.05, 0.10], epoch_s=10.0)
    ratios = {r["label"]: r for r in compare([full, quick, weak])}
    # 0.197 >= 0.98 * 0.20 first at the second epoch: 20 s against the full run's 200 s
    assert ratios["sampled(a)"]["train_s_to_98pct"] == 20.0
    assert ratios["sampled(a)"]["time_ratio_to_98pct"] == 0.1
    assert ratios["sampled(a)"]["ndcg_ratio"] == 0.995
    assert ratios["sampled(a)"]["meets_target"]
    assert ratios["sampled(b)"]["train_s_to_98pct"] is None
    assert not ratios["sampled(b)"]["meets_target"]
    table = table_markdown([full, quick, weak], list(ratios.values()))
    assert "| sampled(b) |" in table and table.count("\n") == 4
