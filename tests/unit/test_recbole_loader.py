"""The UniSRec/RecBole dataset layout (``sluice.data.recbole``) and its dispatch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from sluice.data.interactions import load_data
from sluice.data.recbole import (
    is_recbole,
    load_recbole_catalog,
    load_recbole_interactions,
    text_brand,
)
from sluice.eval.metrics import leave_one_out

SCIENTIFIC = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "amazon-scientific"

HEADER = "user_id:token\titem_id_list:token_seq\titem_id:token\n"
ASINS = ["B000A", "B000B", "B000C", "B000D", "B000E"]  # item index 0..4
TEXTS = {a: f"Title {a}. Cat {i}. Brand {i}." for i, a in enumerate(ASINS)}
USERS = ["UZ", "UA", "UM"]  # user index 0..2
# full sequences (item indexes), in order
SEQUENCES = {0: [0, 1, 2, 3], 1: [4, 2, 0], 2: [1, 3, 4, 0, 2]}


def _inter(rows: list[tuple[int, list[int], int]]) -> str:
    return HEADER + "".join(f"{u}\t{' '.join(map(str, h))}\t{t}\n" for u, h, t in rows)


def _write(directory: Path, prefix: str = "Tiny", valid_override: int | None = None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    # .text rows in another order than the index, as in the real data
    (directory / f"{prefix}.text").write_text(
        "item_id:token\ttext:token_seq\n" + "".join(f"{a}\t{TEXTS[a]} \n" for a in reversed(ASINS)),
        encoding="utf-8",
    )
    (directory / f"{prefix}.item2index").write_text(
        "".join(f"{a}\t{i}\n" for i, a in reversed(list(enumerate(ASINS))))
    )
    (directory / f"{prefix}.user2index").write_text(
        "".join(f"{u}\t{i}\n" for i, u in enumerate(USERS))
    )
    train, valid, test = [], [], []
    for u, seq in SEQUENCES.items():
        test.append((u, seq[:-1], seq[-1]))
        valid.append((u, seq[:-2], seq[-2]))
        train.extend((u, seq[:k], seq[k]) for k in range(len(seq) - 2, 0, -1))
    if valid_override is not None:
        u, h, _ = valid[1]
        valid[1] = (u, h, valid_override)
    # test rows out of user order: users must still come out in user2index order
    (directory / f"{prefix}.test.inter").write_text(_inter(test[::-1]))
    (directory / f"{prefix}.valid.inter").write_text(_inter(valid))
    (directory / f"{prefix}.train.inter").write_text(_inter(train))
    return directory


def test_catalog_ids_and_titles(tmp_path: Path) -> None:
    data = _write(tmp_path / "ds")
    assert is_recbole(data)
    catalog = load_recbole_catalog(data)
    assert catalog.item_ids.tolist() == [0, 1, 2, 3, 4]
    assert catalog.titles == [TEXTS[a].strip() for a in ASINS]
    assert catalog.categories == ["unknown"]
    assert [catalog.brand_of(r) for r in range(5)] == [f"Brand {i}" for i in range(5)]
    assert catalog.price_cents.tolist() == [0] * 5 and catalog.in_stock.all()


@pytest.mark.parametrize(
    ("text", "brand"),
    [
        ("Sanding Roll. Industrial & Scientific Abrasives. PORTER-CABLE.", "PORTER-CABLE"),
        ("No. 2 Pencil, 0.5 mm. Office. Ticonderoga.", "Ticonderoga"),  # ". " in the title
        ("Sanding Roll. Industrial & Scientific Abrasives.", ""),  # no brand field
        ("Eyewear, Clear. . .", ""),  # empty categories and brand
        ("", ""),
    ],
)
def test_brand_is_the_last_field(text: str, brand: str) -> None:
    assert text_brand(text) == brand


def test_sequences_and_leave_one_out(tmp_path: Path) -> None:
    data = _write(tmp_path / "ds", prefix="Other")
    catalog, log = load_data(data)
    assert log.user_ids == USERS
    seqs = log.sequences()
    for u, seq in SEQUENCES.items():
        assert catalog.item_ids[seqs[u]].tolist() == seq
    for ts in log.time_sequences():
        assert (np.diff(ts) > 0).all()
    train, valid, test = leave_one_out(log)
    for u, seq in SEQUENCES.items():
        assert int(catalog.item_ids[test[u]]) == seq[-1]  # the test row's target
        assert int(catalog.item_ids[valid[u]]) == seq[-2]  # the valid row's target
        assert catalog.item_ids[train[u]].tolist() == seq[:-2]
    # against a given (built) catalog: the same log
    _, again = load_data(data, catalog)
    assert np.array_equal(again.item_rows, log.item_rows)
    assert np.array_equal(again.user_index, log.user_index)


def test_inconsistent_valid_row_raises(tmp_path: Path) -> None:
    data = _write(tmp_path / "ds", valid_override=4)
    catalog = load_recbole_catalog(data)
    with pytest.raises(ValueError, match="validation target"):
        load_recbole_interactions(data, catalog)


def test_other_layouts_are_not_recbole(tmp_path: Path) -> None:
    assert not is_recbole(tmp_path)
    data = _write(tmp_path / "ds")
    (data / "Second.text").write_text("item_id:token\ttext:token_seq\n")
    assert not is_recbole(data)  # two *.text files: no single prefix


def test_real_amazon_scientific() -> None:
    if not SCIENTIFIC.exists():
        pytest.fail(
            f"data missing: {SCIENTIFIC} does not exist (../shared/data/amazon-scientific "
            "from the repository root)",
            pytrace=False,
        )
    assert is_recbole(SCIENTIFIC)
    catalog, log = load_data(SCIENTIFIC)
    assert len(catalog) == 4385
    assert log.num_users == 8442
    # the brand of every item but 12 whose brand field is empty (". ." at the end)
    assert (catalog.brand_codes == catalog.brands.index("unknown")).sum() == 12
    assert len(catalog.brands) == 1561
    assert np.bincount(catalog.brand_codes).max() == 175
    assert catalog.brand_of(int(np.bincount(catalog.brand_codes).argmax())) != ""
    lengths = np.bincount(log.user_index, minlength=log.num_users)
    assert lengths.min() >= 3, f"{int((lengths < 3).sum())} users with < 3 interactions"
    assert (log.item_rows >= 0).all()
