"""Live catalog updates across real processes: the gateway takes UpdateItems, and recall,
coarse, fine and rerank (each its own process) follow the update log, while a steady load
of Search and Recommend runs with no deadline. Nothing may fail meanwhile."""

from __future__ import annotations

import os
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from google.protobuf import field_mask_pb2
from prometheus_client.parser import text_string_to_metric_families

from sluice.artifacts import Artifacts
from sluice.common.v1 import common_pb2
from sluice.gateway.spelling import Speller
from sluice.launch import STAGES, Cluster
from sluice.v1 import catalog_pb2, catalog_pb2_grpc, storefront_pb2, storefront_pb2_grpc
from tests.integration.conftest import running_cluster
from tests.integration.fuzzing import fuzz
from tests.integration.storefront_load import Load
from tests.integration.test_cascade import field_violations
from tests.integration.test_foreign_client import node_client, run_node_client

pytestmark = pytest.mark.integration
__all__ = ["node_client"]

KEY = "test-catalog-key"
VISIBLE_S = 5.0
CASES = int(os.environ.get("SLUICE_FUZZ_CASES", "300"))


@pytest.fixture(scope="module")
def live(tiny_artifacts: Artifacts, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    base = tmp_path_factory.mktemp("catalog-live")
    yield from running_cluster(tiny_artifacts, base, catalog_keys=(KEY,))


def _stubs(
    c: Cluster,
) -> tuple[storefront_pb2_grpc.StorefrontServiceStub, catalog_pb2_grpc.CatalogServiceStub]:
    channel = grpc.insecure_channel(c.gateway_address)
    return (
        storefront_pb2_grpc.StorefrontServiceStub(channel),
        catalog_pb2_grpc.CatalogServiceStub(channel),
    )


def _update(
    catalog: catalog_pb2_grpc.CatalogServiceStub, *updates: catalog_pb2.ItemUpdate
) -> catalog_pb2.UpdateItemsResponse:
    response: catalog_pb2.UpdateItemsResponse = catalog.UpdateItems(
        catalog_pb2.UpdateItemsRequest(updates=updates), metadata=(("x-api-key", KEY),)
    )
    return response


def _until(condition: Callable[[], bool]) -> float:
    """Seconds until ``condition`` held, polling; fails past VISIBLE_S."""
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < VISIBLE_S, f"not visible within {VISIBLE_S} s"
    return time.monotonic() - start


def _read_up_to(c: Cluster, process: str) -> float:
    """``sluice_catalog_read_up_to_timestamp_seconds`` of one process (0 when absent)."""
    url = f"http://127.0.0.1:{c.metrics_port_of(process)}/metrics"
    with urllib.request.urlopen(url, timeout=5) as response:
        families = text_string_to_metric_families(response.read().decode())
    name = "sluice_catalog_read_up_to_timestamp_seconds"
    return max([s.value for f in families for s in f.samples if s.name == name] or [0.0])


def _every_stage_read(c: Cluster) -> bool:
    """Whether every stage has read the update log as far as the gateway that took it."""
    written = _read_up_to(c, "gateway")
    return written > 0 and all(_read_up_to(c, stage) >= written for stage in STAGES)


def _page(
    response: storefront_pb2.SearchResponse | storefront_pb2.RecommendResponse,
) -> list[int]:
    """The page's item ids, from every stage: a degraded page (a stage shed the call, and
    the gateway recalled popular items itself) says nothing about what the stages read."""
    degraded = {s.stage: s.degraded_reason for s in response.stages if s.degraded}
    assert not degraded, f"a stage degraded: {degraded}"
    return list(response.page.item_ids)


def _price_filter(max_cents: int) -> common_pb2.ItemFilter:
    return common_pb2.ItemFilter(price_cents=common_pb2.Int64Range(max=max_cents))


def test_updates_reach_every_process_under_load(
    live: Cluster, tiny_artifacts: Artifacts, tmp_path: Path
) -> None:
    shop, catalog = _stubs(live)
    users, _ = tiny_artifacts.users()
    new_id = int(tiny_artifacts.catalog.item_ids.max()) + 500

    def search(query: str, *filters: common_pb2.ItemFilter) -> list[int]:
        request = storefront_pb2.SearchRequest(query=query, page_size=10, item_filters=filters)
        return _page(shop.Search(request))

    def home(user: str) -> list[int]:
        request = storefront_pb2.RecommendRequest(user_id=user, page_size=20)
        return _page(shop.Recommend(request))

    with Load(live.gateway_address, users[:50], rate=20.0, threads=4) as load:
        load.wait_for(20)
        started = time.monotonic()
        # a new item: searchable once every stage has read the log
        made = _update(
            catalog,
            catalog_pb2.ItemUpdate(
                item=catalog_pb2.CatalogItem(
                    item_id=new_id,
                    title="Quibbleflux aurora teapot",
                    description="A teapot that glows like the aurora.",
                    brand="Quibbleflux",
                    price_cents=2_500,
                    in_stock=True,
                )
            ),
        )
        assert made.created_count == 1 and 0 < made.room_left_count < 10_000
        # searchable once every stage has read the log, as each one's metric tells (polling
        # the metrics, not Search: a tight loop of searches would overload the stages)
        new_visible_s = _until(lambda: _every_stage_read(live))
        assert new_id in search("quibbleflux teapot")

        # a price change: the next page from this gateway already follows it
        assert new_id in search("quibbleflux teapot", _price_filter(3_000))
        _update(
            catalog,
            catalog_pb2.ItemUpdate(
                item=catalog_pb2.CatalogItem(item_id=new_id, price_cents=3_500),
                update_mask=field_mask_pb2.FieldMask(paths=["price_cents"]),
            ),
        )
        assert new_id not in search("quibbleflux teapot", _price_filter(3_000))
        assert new_id in search("quibbleflux teapot")  # the mask kept every other field

        # a build item out of stock, then deleted: gone from the next page
        user = users[7]
        top = home(user)[0]
        _update(
            catalog,
            catalog_pb2.ItemUpdate(
                item=catalog_pb2.CatalogItem(item_id=top, in_stock=False),
                update_mask=field_mask_pb2.FieldMask(paths=["in_stock"]),
            ),
        )
        assert top not in home(user)
        gone = catalog_pb2.ItemUpdate(item=catalog_pb2.CatalogItem(item_id=new_id), delete=True)
        assert _update(catalog, gone).deleted_count == 1
        assert new_id not in search("quibbleflux teapot")
        # back in stock: on the page again once every stage has read it
        _update(
            catalog,
            catalog_pb2.ItemUpdate(
                item=catalog_pb2.CatalogItem(item_id=top, in_stock=True),
                update_mask=field_mask_pb2.FieldMask(paths=["in_stock"]),
            ),
        )
        _until(lambda: _every_stage_read(live))
        assert top in home(user)
        load.wait_for(20, after=time.monotonic())
        ended = time.monotonic()

    answers = load.between(started - 1, ended)
    failed = [a.code for a in answers if a.code is not grpc.StatusCode.OK]
    assert answers and not failed, f"{len(failed)} of {len(answers)} calls failed"
    assert not [a for a in answers if a.degraded], "a stage degraded during the updates"
    assert new_visible_s < VISIBLE_S


def test_update_items_needs_a_catalog_key_and_names_bad_fields(
    live: Cluster, tiny_artifacts: Artifacts
) -> None:
    _, catalog = _stubs(live)
    known = int(tiny_artifacts.catalog.item_ids[0])
    request = catalog_pb2.UpdateItemsRequest(
        updates=[catalog_pb2.ItemUpdate(item=catalog_pb2.CatalogItem(item_id=1, price_cents=1))]
    )
    for metadata in [(), (("x-api-key", "forged"),), (("authorization", "Bearer a.b.c"),)]:
        with pytest.raises(grpc.RpcError) as err:
            catalog.UpdateItems(request, metadata=metadata)  # no deadline
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    bad = catalog_pb2.UpdateItemsRequest(
        updates=[
            catalog_pb2.ItemUpdate(
                item=catalog_pb2.CatalogItem(item_id=known, price_cents=-5),
                update_mask=field_mask_pb2.FieldMask(paths=["price_cents"]),
            )
        ]
    )
    with pytest.raises(grpc.RpcError) as err:
        catalog.UpdateItems(bad, metadata=(("x-api-key", KEY),))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "updates[0].item.price_cents" in field_violations(err.value)
    # raw bytes that are no UpdateItemsRequest: INVALID_ARGUMENT, not INTERNAL
    raw = grpc.insecure_channel(live.gateway_address).unary_unary(
        "/sluice.v1.CatalogService/UpdateItems"
    )
    with pytest.raises(grpc.RpcError) as err:
        raw(b"\xff\xff\xff\x0f garbage", metadata=(("x-api-key", KEY),))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_fuzzed_updates_get_a_clear_answer(live: Cluster, tiny_artifacts: Artifacts) -> None:
    """Generated and mutated UpdateItems batches, with a valid key (so that they reach the
    validation): never INTERNAL, UNKNOWN or a hang, and the cluster still serves."""
    ids = tiny_artifacts.catalog.item_ids
    seeds = [
        catalog_pb2.UpdateItemsRequest(
            updates=[
                catalog_pb2.ItemUpdate(
                    item=catalog_pb2.CatalogItem(item_id=int(ids[9]), price_cents=700),
                    update_mask=field_mask_pb2.FieldMask(paths=["price_cents"]),
                ),
                catalog_pb2.ItemUpdate(
                    item=catalog_pb2.CatalogItem(item_id=int(ids.max()) + 900, title="Fuzz kit"),
                ),
            ]
        ).SerializeToString()
    ]
    path = "/sluice.v1.CatalogService/UpdateItems"
    codes, bad = fuzz(
        live.gateway_address,
        path,
        catalog_pb2.UpdateItemsRequest,
        seeds,
        CASES,
        (("x-api-key", KEY),),
    )
    assert not bad, f"{len(bad)} bad answers, first: {bad[:5]}"
    assert codes["OK"] and codes["INVALID_ARGUMENT"], codes
    shop, _ = _stubs(live)
    assert shop.Search(storefront_pb2.SearchRequest(query="shoes", page_size=5)).page.item_ids
    dead = [p for p, proc in live.processes.items() if proc.poll() is not None]
    assert not dead, f"died under fuzzing: {dead}"


def test_a_nodejs_feed_adds_an_item(
    live: Cluster, node_client: Path, tiny_artifacts: Artifacts
) -> None:
    item = int(tiny_artifacts.catalog.item_ids[3])
    # a word one typo from the catalog's most used long title word: the build's speller
    # corrects it, so only the gateway learning the new item's title keeps it as typed
    catalog = tiny_artifacts.catalog
    counts = Counter(w for t in catalog.titles for w in set(t.lower().split()) if w.isalpha())
    word = next(w for w, _ in counts.most_common() if len(w) >= 6)
    live_word = word[0] + word[2:]
    assert Speller.from_catalog(catalog).correct(live_word) == word
    env = {"SLUICE_CATALOG_KEY": KEY, "SLUICE_LIVE_WORD": live_word}
    report = run_node_client(node_client, live.gateway_address, item, env)
    made = report["catalog"]
    assert made["live_word_searched"] == f"{live_word} lantern"
    assert made["created"] == 1
    assert made["unauthenticated"] == "UNAUTHENTICATED"
    assert made["bad_mask"] == ["INVALID_ARGUMENT", ["updates[0].update_mask.paths[0]"]]
    assert made["search"][0] == made["item_id"], made
    assert made["visible_after_ms"] < VISIBLE_S * 1000
