"""Live catalog updates through the real engines: every stage loaded by its own loader with
room for new items, following one update log, and a gateway that takes UpdateItems."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from sluice.artifacts import Artifacts
from sluice.config import GatewaySettings, RecallSettings
from sluice.core.errors import FailedPrecondition, InvalidArgument
from sluice.data.filters import AttributeFilter
from sluice.data.updates import (
    FileUpdateLog,
    ItemChange,
    RedisUpdateLog,
    feed_for,
    follow_updates,
    serving_artifacts,
)
from sluice.domain import Budget, RankContext, Source, StageName, Surface
from sluice.embed.text import MiniLMEncoder
from sluice.gateway.catalog import CatalogWriter, ItemEdit
from sluice.gateway.explain import Explainer, ReasonCode
from sluice.gateway.pipeline import Gateway, QueryEncoder
from sluice.gateway.stages import LocalStage
from sluice.gateway.users import UserHistory, item_attributes
from sluice.recall.engine import RecallEngine
from sluice.recall.loader import load as load_recall
from sluice.state.store import InMemoryStateStore
from sluice.wiring import load_engines

ROOM = 12
NEW_ITEM = {
    "title": "Zorblax quantum kettle",
    "description": "A kettle that boils water with quantum zorblax coils.",
    "category": "",
    "brand": "Zorblax",
    "color": "teal",
    "price_cents": 4_599,
    "in_stock": True,
}


@dataclass
class Live:
    gateway: Gateway
    writer: CatalogWriter
    engines: dict[StageName, Any]
    settings: GatewaySettings
    options: dict[str, Any]

    def ids(self, **search: Any) -> list[int]:
        result = self.gateway.search(page_size=20, deadline_s=30.0, **search)
        return result.candidates.item_ids.tolist()

    def home(self, user: str) -> list[int]:
        result = self.gateway.recommend(user_id=user, page_size=20, deadline_s=30.0)
        return result.candidates.item_ids.tolist()


@pytest.fixture(scope="module")
def live(
    tiny_artifacts: Artifacts, encoder: MiniLMEncoder, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Live]:
    options: dict[str, Any] = {
        "catalog_updates": str(tmp_path_factory.mktemp("updates") / "catalog.jsonl"),
        "catalog_room": ROOM,
    }
    closers: list[Callable[[], None]] = []
    overrides = {name: dict(options) for name in ("recall", "coarse", "fine", "rerank")}
    overrides["fine"]["backend"] = "torch"
    engines = load_engines(tiny_artifacts.root, closers, overrides)
    settings = GatewaySettings(artifacts=tiny_artifacts.root, **options)
    artifacts = serving_artifacts(tiny_artifacts.root, settings)
    mine = follow_updates(settings, artifacts, closers)
    feed = feed_for(settings)
    assert mine is not None and feed is not None
    writer = CatalogWriter(mine, feed, encoder.encode)
    store = InMemoryStateStore(item_attributes(artifacts.catalog))
    gateway = Gateway(
        {stage: LocalStage(stage, engine) for stage, engine in engines.items()},
        artifacts.catalog,
        UserHistory.from_artifacts(artifacts, store),
        QueryEncoder(encoder.encode),
        explainer=Explainer.from_artifacts(artifacts),
        catalog_writer=writer,
    )
    yield Live(gateway, writer, engines, settings, options)
    for close in reversed(closers):
        close()


def _new_id(tiny_artifacts: Artifacts, k: int) -> int:
    return int(tiny_artifacts.catalog.item_ids.max()) + 1000 + k


def test_a_new_item_is_searchable_at_once(live: Live, tiny_artifacts: Artifacts) -> None:
    item = _new_id(tiny_artifacts, 1)
    assert item not in live.ids(query="zorblax kettle")
    counts = live.writer.update([ItemEdit(item, NEW_ITEM)])
    assert (counts.created, counts.updated, counts.deleted) == (1, 0, 0)
    assert counts.room_left == ROOM - 1
    assert live.ids(query="zorblax kettle")[0] == item  # BM25 of the new words
    # recall's MiniLM source finds it by meaning too, from the vector the gateway embedded
    recall: RecallEngine = live.engines[StageName.RECALL]
    query = live.gateway.encode_query("quantum zorblax kettle")
    lists = recall.source_lists(RankContext(query="qqq", query_embedding=query), 50)
    ann_ids = recall.assets.catalog.item_ids[lists[Source.ANN][0]]
    assert item in ann_ids.tolist()
    # and it passes the filters on its attributes, in every stage
    teal = (AttributeFilter("color", any_of=("teal",)),)
    assert live.ids(query="kettle", filters=teal) == [item]
    # explained like any item, from what ranked it (its words), and as a seed of a page
    explained = live.gateway.search(
        query="zorblax kettle", page_size=5, deadline_s=30.0, explain=True
    )
    assert explained.reasons[0].code == ReasonCode.MATCHES_QUERY
    similar = live.gateway.recommend(
        user_id="",
        surface=Surface.SIMILAR_ITEMS,
        context_item_id=item,
        page_size=5,
        deadline_s=30.0,
        explain=True,
    )
    assert len(similar.candidates) == 5 and item not in similar.candidates.item_ids.tolist()
    # the same call again is an update, not a second item
    again = live.writer.update([ItemEdit(item, NEW_ITEM)])
    assert (again.created, again.updated, again.room_left) == (0, 1, ROOM - 1)


def test_price_and_stock_changes_reach_the_next_page(live: Live, tiny_artifacts: Artifacts) -> None:
    item = _new_id(tiny_artifacts, 2)
    live.writer.update([ItemEdit(item, {**NEW_ITEM, "title": "Plumbus deluxe grinder"})])
    cheap = (AttributeFilter("price_cents", max=5_000),)
    assert item in live.ids(query="plumbus grinder", filters=cheap)
    live.writer.update([ItemEdit(item, {"price_cents": 9_999})])
    assert item not in live.ids(query="plumbus grinder", filters=cheap)
    assert item in live.ids(query="plumbus grinder")
    live.writer.update([ItemEdit(item, {"in_stock": False})])
    assert item not in live.ids(query="plumbus grinder")  # re-ranking shows only stock


def test_a_build_item_changes_and_hides(live: Live, tiny_artifacts: Artifacts) -> None:
    users, _ = tiny_artifacts.users()
    user = users[5]
    page = live.home(user)
    top = page[0]
    title = tiny_artifacts.catalog.titles[tiny_artifacts.catalog.row(top)]
    assert top in live.ids(query=title)
    counts = live.writer.update([ItemEdit(top, {}, delete=True)])
    assert counts.deleted == 1
    assert top not in live.home(user)
    assert top not in live.ids(query=title)
    similar = live.gateway.recommend(
        user_id=user, context_item_id=page[1], page_size=50, deadline_s=30.0
    )
    assert top not in similar.candidates.item_ids.tolist()
    # a later update shows it again
    live.writer.update([ItemEdit(top, {"in_stock": True})])
    assert top in live.ids(query=title)


def test_bad_batches_change_nothing(live: Live, tiny_artifacts: Artifacts) -> None:
    before = live.writer.live.catalog.version
    item = _new_id(tiny_artifacts, 3)
    cases: list[tuple[list[ItemEdit], str]] = [
        ([], "updates"),
        ([ItemEdit(item, {"price_cents": 5})], "updates[0].item.title"),
        ([ItemEdit(0, NEW_ITEM)], "updates[0].item.item_id"),
        ([ItemEdit(item, NEW_ITEM), ItemEdit(item, {"title": " "})], "updates[1].item.title"),
        ([ItemEdit(item, {**NEW_ITEM, "price_cents": -1})], "updates[0].item.price_cents"),
        ([ItemEdit(item, {**NEW_ITEM, "brand": "x" * 300})], "updates[0].item.brand"),
    ]
    for edits, field in cases:
        with pytest.raises(InvalidArgument) as err:
            live.writer.update(edits)
        assert err.value.field_path == field
    assert live.writer.live.catalog.version == before
    assert item not in live.ids(query="zorblax kettle")


def test_room_is_checked_before_anything_is_written(live: Live, tiny_artifacts: Artifacts) -> None:
    left = live.writer.live.room_left
    edits = [
        ItemEdit(_new_id(tiny_artifacts, 100 + k), {**NEW_ITEM, "title": f"Gizmo {k}"})
        for k in range(left + 1)
    ]
    with pytest.raises(FailedPrecondition):
        live.writer.update(edits)
    assert live.writer.live.room_left == left


def test_a_process_that_starts_later_replays_the_log(live: Live, tiny_artifacts: Artifacts) -> None:
    item = _new_id(tiny_artifacts, 4)
    live.writer.update([ItemEdit(item, {**NEW_ITEM, "title": "Snozzberry juicer"})])
    closers: list[Callable[[], None]] = []
    recall = load_recall(RecallSettings(artifacts=tiny_artifacts.root, **live.options), closers)
    try:
        found = recall.retrieve(RankContext(query="snozzberry juicer"), Budget(10))
        assert found.item_ids[0] == item
    finally:
        for close in closers:
            close()


# -- the logs ------------------------------------------------------------------------
def _changes(n: int) -> list[ItemChange]:
    vec = np.arange(384, dtype=np.float32)
    return [ItemChange(k + 1, {"price_cents": k, "title": f"t{k}"}, False, vec) for k in range(n)]


def test_file_log_reads_only_whole_records(tmp_path: Path) -> None:
    log = FileUpdateLog(tmp_path / "u.jsonl")
    log.append(_changes(3))
    got, position = log.read("")
    assert [c.item_id for c in got] == [1, 2, 3]
    assert got[0].text_vector is not None
    np.testing.assert_array_equal(got[0].text_vector, np.arange(384, dtype=np.float32))
    with open(log.path, "ab") as fh:  # a writer killed mid-record
        fh.write(b'{"i": 9, "f": {"pri')
    assert log.read(position) == ([], position)
    log.append([ItemChange(4, delete=True)])  # the next writer cuts the torn record off
    got, _ = log.read(position)
    assert [(c.item_id, c.delete) for c in got] == [(4, True)]


def test_redis_log_round_trip(redis_server: Any) -> None:
    log = RedisUpdateLog(redis_server.url, key=f"test:{{catalog}}:{id(redis_server)}")
    log.client.delete(log.key)
    try:
        assert log.read("") == ([], "")
        log.append(_changes(2))
        got, position = log.read("")
        assert [(c.item_id, c.values["price_cents"]) for c in got] == [(1, 0), (2, 1)]
        log.append([ItemChange(3, delete=True)])
        got, _ = log.read(position)
        assert [(c.item_id, c.delete) for c in got] == [(3, True)]
    finally:
        log.client.delete(log.key)
        log.close()


def test_a_damaged_log_does_not_stop_the_catalog(live: Live, tiny_artifacts: Artifacts) -> None:
    """Records another writer damaged (bad types, a wrong vector, bytes that are no UTF-8 or
    no JSON) are skipped; the records after them still apply."""
    item = _new_id(tiny_artifacts, 7)
    path = Path(live.options["catalog_updates"])
    with open(path, "ab") as fh:
        fh.write(b'{"i": 5, "f": {"price_cents": "cheap"}}\n')
        fh.write(b'{"i": 6, "f": {"in_stock": 1}, "v": "AAAA"}\n')
        fh.write(b"\xff\xfe not json\n")
    live.writer.update([ItemEdit(item, {**NEW_ITEM, "title": "Wibblewort lamp"})])
    assert live.ids(query="wibblewort lamp")[0] == item


def test_a_build_skips_the_changes_older_than_its_data() -> None:
    """A build made from an export taken at ``as_of`` already holds what was changed before
    then (or newer values): replaying those changes would put stale prices back, and give
    items it already has another row of its room."""
    from sluice.data.catalog import Catalog
    from sluice.data.updates import LiveCatalog

    base = Catalog.from_columns([1, 2], ["Red kettle", "Blue lamp"], price_cents=[500, 900])
    live = LiveCatalog(base.with_room(4), None, as_of_ms=1_000)
    live.apply(
        [
            ItemChange(1, {"price_cents": 100}, ts_ms=999),  # before the export: stale
            ItemChange(3, {**NEW_ITEM, "title": "Old lamp"}, ts_ms=10),  # in the export, or gone
            ItemChange(2, {"price_cents": 700}, ts_ms=1_000),
            ItemChange(4, {**NEW_ITEM, "title": "New lamp"}, ts_ms=2_000),
        ]
    )
    cat = live.catalog
    assert cat.price_cents[cat.row(1)] == 500 and cat.price_cents[cat.row(2)] == 700
    assert cat.row(3) < 0 and cat.row(4) == 2 and live.room_left == 3
