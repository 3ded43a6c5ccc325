"""The fine ranker: shapes, padding invariances, persistence, the query path and learning."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from sluice.fine.model import FineRanker, RankerConfig, pad_histories
from sluice.fine.train import full_scores, train_ranker

NUM_ITEMS = 40
TEXT_DIM = 384


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny models run fastest (and steadiest on a shared machine) on one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _text(num_items: int = NUM_ITEMS, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    table = rng.normal(size=(num_items + 1, TEXT_DIM)).astype(np.float32)
    table /= np.linalg.norm(table, axis=1, keepdims=True)
    table[0] = 0.0
    return table


def _model(**overrides: object) -> FineRanker:
    torch.manual_seed(0)
    cfg = RankerConfig(dim=32, heads=2, layers=2, max_len=10, **overrides)  # type: ignore[arg-type]
    return FineRanker(NUM_ITEMS, _text(), cfg).eval()


def _no_query(b: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.zeros(b, TEXT_DIM), torch.zeros(b, dtype=torch.bool)


def test_shapes() -> None:
    model = _model()
    hist = torch.tensor([[0, 0, 3, 4, 5], [1, 2, 3, 4, 5]])
    cands = torch.tensor([[1, 2, 3, 0], [7, 8, 9, 10]])
    q, has = _no_query(2)
    assert model.score(hist, cands, q, has).shape == (2, 4)
    assert model.encode(hist, q, has).shape == (2, 32)
    assert model.item_vectors(cands).shape == (2, 4, 32)
    assert torch.all(model.item_vectors(torch.tensor([0])) == 0)


@pytest.mark.parametrize("use_text", [True, False])
def test_padding_does_not_change_real_scores(use_text: bool) -> None:
    model = _model(use_text=use_text)
    q, has = _no_query(1)
    hist = torch.tensor([[3, 4, 5]])
    cands = torch.tensor([[6, 7, 8]])
    base = model.score(hist, cands, q, has)
    padded_hist = torch.tensor([[0, 0, 0, 0, 3, 4, 5]])
    padded_cands = torch.tensor([[6, 0, 7, 8, 0]])
    out = model.score(padded_hist, padded_cands, q, has)
    torch.testing.assert_close(out[:, [0, 2, 3]], base, rtol=1e-5, atol=1e-5)
    # batching with a longer history (more left padding for this row) changes nothing
    batch = pad_histories([np.array([3, 4, 5]), np.arange(1, 10)], max_len=10)
    q2, has2 = _no_query(2)
    out2 = model.score(batch, torch.tensor([[6, 7, 8], [1, 2, 3]]), q2, has2)
    torch.testing.assert_close(out2[:1], base, rtol=1e-5, atol=1e-5)


def test_history_longer_than_max_len_keeps_the_most_recent() -> None:
    model = _model()
    q, has = _no_query(1)
    long = torch.arange(1, 21).unsqueeze(0)  # 20 items, max_len 10
    cands = torch.tensor([[1, 2, 3]])
    torch.testing.assert_close(
        model.score(long, cands, q, has), model.score(long[:, -10:], cands, q, has)
    )


def test_save_load_round_trip(tmp_path: Path) -> None:
    model = _model()
    hist = torch.tensor([[0, 1, 2, 3], [5, 6, 7, 8]])
    cands = torch.tensor([[4, 5, 6], [9, 10, 11]])
    q = torch.randn(2, TEXT_DIM)
    has = torch.tensor([True, False])
    model.save(tmp_path / "ranker")
    loaded = FineRanker.load(tmp_path / "ranker", map_location="cpu")
    assert loaded.cfg == model.cfg
    assert torch.equal(model.score(hist, cands, q, has), loaded.score(hist, cands, q, has))


def test_query_changes_scores_and_is_ignored_without_flag() -> None:
    model = _model()
    hist = torch.tensor([[1, 2, 3]])
    cands = torch.tensor([[4, 5, 6]])
    q = torch.from_numpy(_text()[5:6])
    no = model.score(hist, cands, *_no_query(1))
    off = model.score(hist, cands, q, torch.tensor([False]))
    on = model.score(hist, cands, q, torch.tensor([True]))
    torch.testing.assert_close(off, no)
    assert not torch.allclose(on, no)
    # an empty history with a query still gives finite scores
    empty = model.score(torch.zeros(1, 3, dtype=torch.long), cands, q, torch.tensor([True]))
    assert torch.isfinite(empty).all()


def test_eval_mode_is_deterministic() -> None:
    model = _model()
    hist = torch.tensor([[1, 2, 3]])
    cands = torch.tensor([[4, 5, 6]])
    assert torch.equal(
        model.score(hist, cands, *_no_query(1)), model.score(hist, cands, *_no_query(1))
    )


def test_scoring_a_training_model_uses_eval_mode_and_restores_it() -> None:
    model = _model(dropout=0.5)
    hist, cands = torch.tensor([[1, 2, 3]]), torch.tensor([[4, 5, 6]])
    served = model.eval().score(hist, cands, *_no_query(1))
    model.train()
    assert torch.equal(model.score(hist, cands, *_no_query(1)), served)  # no dropout
    assert model.training
    assert all(m.training for m in model.modules())
    torch.testing.assert_close(model.score_all(hist, *_no_query(1))[:, 4:7], served)
    assert model.training


def test_train_ranker_learns_a_sequential_pattern() -> None:
    """Item k is always followed by item k + 1 (catalog rows, cyclic)."""
    num_items = 30
    rng = np.random.default_rng(0)
    seqs = [(rng.integers(num_items) + np.arange(8)) % num_items for _ in range(300)]
    cfg = RankerConfig(
        dim=32, heads=2, layers=1, max_len=8, dropout=0.1, lr=5e-3, batch_size=64, num_threads=1
    )
    text = _text(num_items)
    model = train_ranker(seqs, num_items, text, cfg, epochs=8, seed=0, progress=False)
    hist = [(s[:4] + 3) % num_items for s in seqs[:100]]
    target = np.array([(h[-1] + 1) % num_items for h in hist])
    top1 = full_scores(model, hist).argmax(1).numpy()
    assert (top1 == target).mean() > 0.9


def test_compressed_variants_score_like_fp32() -> None:
    from sluice.fine.quantize import quantize_int8, to_bf16

    model = _model()
    hist = torch.tensor([[0, 1, 2, 3], [5, 6, 7, 8]])
    cands = torch.arange(1, NUM_ITEMS + 1).repeat(2, 1)
    q, has = torch.randn(2, TEXT_DIM), torch.tensor([True, False])
    ref = model.score(hist, cands, q, has)
    for variant in (quantize_int8(model), to_bf16(model)):
        out = variant.score(hist, cands, q, has).float()
        assert out.shape == ref.shape
        corr = torch.corrcoef(torch.stack([out.flatten(), ref.flatten()]))[0, 1]
        assert corr > 0.95


def test_served_item_table_matches_projecting_per_request_and_follows_weight_changes() -> None:
    model = _model()
    hist = torch.tensor([[0, 3, 4, 5], [1, 2, 3, 4]])
    cands = torch.tensor([[1, 2, 3, 0], [7, 8, 9, 10]])
    q = torch.from_numpy(_text()[[6, 11]])
    has = torch.tensor([True, False])

    def direct() -> torch.Tensor:  # the per-request projection the table replaces
        with torch.no_grad():
            user = model._hidden(hist, q, has)[:, -1]
            out = torch.einsum("bd,bcd->bc", user, model.item_vectors(cands))
            return out + model.query_match(q, cands) * has.unsqueeze(1).float()

    assert torch.allclose(model.score(hist, cands, q, has), direct(), atol=1e-5)
    first = model.score(hist, cands, q, has)

    # a training step changes the weights: the table must not serve stale vectors
    model.train()
    with torch.no_grad():
        assert model.text_proj is not None
        model.text_proj.weight.copy_(torch.randn_like(model.text_proj.weight))
    model.eval()
    after = model.score(hist, cands, q, has)
    assert not torch.allclose(after, first)
    assert torch.allclose(after, direct(), atol=1e-5)
