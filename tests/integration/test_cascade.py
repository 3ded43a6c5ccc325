"""The whole cascade over real gRPC, with the fine ranker on a real Triton server."""

from __future__ import annotations

import re
import threading
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from sluice.artifacts import Artifacts
from sluice.client import StorefrontClient
from sluice.common.v1 import common_pb2
from sluice.gateway.blurbs import item_sentences
from sluice.launch import Cluster
from sluice.v1 import storefront_pb2, storefront_pb2_grpc

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def client(cluster: Cluster) -> StorefrontClient:
    return StorefrontClient(cluster.gateway_address)


@pytest.fixture(scope="module")
def known_user(tiny_artifacts: Artifacts) -> tuple[str, np.ndarray]:
    ids, histories = tiny_artifacts.users()
    best = max(range(len(ids)), key=lambda i: len(histories[i]))
    return ids[best], histories[best]


def field_violations(err: grpc.RpcError) -> list[str]:
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    assert status is not None, "error carries no google.rpc.Status"
    fields = []
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            br = error_details_pb2.BadRequest()
            detail.Unpack(br)
            fields += [v.field for v in br.field_violations]
    return fields


def test_recommend_runs_every_stage(
    client: StorefrontClient, known_user: tuple[str, np.ndarray]
) -> None:
    user, history = known_user
    resp = client.recommend(user, page_size=10, timeout_s=5)
    page = resp.page
    assert len(page.item_ids) == 10
    assert len(set(page.item_ids)) == 10
    assert not set(page.item_ids) & set(history.tolist()), (
        "recommended an item the user already has"
    )
    assert [s.stage for s in resp.stages] == [
        common_pb2.STAGE_RECALL,
        common_pb2.STAGE_COARSE_RANK,
        common_pb2.STAGE_FINE_RANK,
        common_pb2.STAGE_RERANK,
    ]
    assert not any(s.degraded for s in resp.stages)
    recall, coarse, fine, _ = resp.stages
    assert recall.candidates_out > coarse.candidates_out >= 10
    assert fine.candidates_in == coarse.candidates_out
    assert all(s.duration_us > 0 for s in resp.stages)
    assert len(page.fine_scores) == 10 and all(np.isfinite(page.fine_scores))
    assert all(t for t in page.titles)


def test_search_respects_filters(client: StorefrontClient, tiny_artifacts: Artifacts) -> None:
    catalog = tiny_artifacts.catalog
    category = catalog.categories[int(np.bincount(catalog.category_codes).argmax())]
    filters = [
        common_pb2.AttributeFilter(field="category", any_of=[category]),
        common_pb2.AttributeFilter(field="price_cents", max=float(np.median(catalog.price_cents))),
    ]
    query = catalog.titles[
        int(np.flatnonzero(catalog.category_codes == catalog.categories.index(category))[0])
    ]
    resp = client.search(" ".join(query.split()[2:5]), page_size=8, filters=filters, timeout_s=5)
    assert len(resp.page.item_ids) > 0
    for item in resp.page.item_ids:
        row = catalog.row(item)
        assert catalog.category_of(row) == category
        assert catalog.price_cents[row] <= np.median(catalog.price_cents)
        assert catalog.in_stock[row]


def test_search_finds_the_named_product(
    client: StorefrontClient, tiny_artifacts: Artifacts
) -> None:
    catalog = tiny_artifacts.catalog
    row = int(np.flatnonzero(catalog.in_stock)[7])
    resp = client.search(catalog.titles[row], page_size=10, timeout_s=5)
    titles = list(resp.page.titles)
    assert catalog.titles[row] in titles[:3]


def test_cold_start_user_gets_popular_items(client: StorefrontClient) -> None:
    resp = client.recommend("never-seen-before", page_size=5, timeout_s=5)
    assert len(resp.page.item_ids) == 5
    assert set(resp.page.sources) == {common_pb2.CANDIDATE_SOURCE_POPULARITY}


def test_pages_chain_without_overlap(
    client: StorefrontClient, known_user: tuple[str, np.ndarray]
) -> None:
    user, _ = known_user
    first = client.recommend(user, page_size=5, timeout_s=5)
    assert first.next_page_token
    second = client.recommend(user, page_size=5, page_token=first.next_page_token, timeout_s=5)
    assert len(second.page.item_ids) == 5
    assert not set(first.page.item_ids) & set(second.page.item_ids)


def test_similar_items_surface(client: StorefrontClient, tiny_artifacts: Artifacts) -> None:
    anchor = int(tiny_artifacts.catalog.item_ids[0])
    resp = client.recommend("", page_size=5, context_item_id=anchor, timeout_s=5)
    assert len(resp.page.item_ids) == 5 and anchor not in resp.page.item_ids


BAD_REQUESTS = [
    ("search", {"query": "", "page_size": 5}, "query"),
    ("search", {"query": "x" * 600, "page_size": 5}, "query"),
    ("search", {"query": "shoes", "page_size": 0}, "page_size"),
    ("search", {"query": "shoes", "page_size": 101}, "page_size"),
    (
        "search",
        {
            "query": "shoes",
            "page_size": 5,
            "filters": [common_pb2.AttributeFilter(field="colour", any_of=["red"])],
        },
        "filters[0].field",
    ),
    ("search", {"query": "shoes", "page_size": 5, "page_token": "garbage!"}, "page_token"),
    ("search", {"query": "shoes", "page_size": 5, "user_id": "u" * 300}, "user_id"),
    (
        "search",
        {"query": "shoes", "page_size": 5, "item_filters": [common_pb2.ItemFilter()]},
        "item_filters[0]",
    ),
    (
        "recommend",
        {
            "user_id": "u",
            "page_size": 5,
            "item_filters": [
                common_pb2.ItemFilter(price_cents=common_pb2.Int64Range(min=900, max=100))
            ],
        },
        "item_filters[0].price_cents.min",
    ),
    (
        "search",
        {
            "query": "shoes",
            "page_size": 5,
            "filters": [common_pb2.AttributeFilter(field="price_cents", min=float("nan"))],
        },
        "filters[0].min",
    ),
    ("recommend", {"user_id": "u", "page_size": 5, "surface": 9}, "surface"),
    (
        "recommend",
        {"user_id": "u", "page_size": 5, "surface": storefront_pb2.SURFACE_SIMILAR_ITEMS},
        "context_item_id",
    ),
    (
        "recommend",
        {"user_id": "u", "page_size": 5, "context_item_id": 999_999_999},
        "context_item_id",
    ),
]


@pytest.mark.parametrize(("rpc", "fields", "offending"), BAD_REQUESTS)
def test_bad_input_is_invalid_argument(
    cluster: Cluster, client: StorefrontClient, rpc: str, fields: dict[str, object], offending: str
) -> None:
    if rpc == "search":
        call, req = client.stub.Search, storefront_pb2.SearchRequest(**fields)  # type: ignore[arg-type]
    else:
        call, req = client.stub.Recommend, storefront_pb2.RecommendRequest(**fields)  # type: ignore[arg-type]
    with pytest.raises(grpc.RpcError) as err:
        call(req, timeout=5)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert offending in field_violations(err.value)
    assert all(p.poll() is None for p in cluster.processes.values())


def test_too_many_filters_are_refused_before_any_work(cluster: Cluster) -> None:
    """10,000 filters fit in a small message; they are counted before any is looked at."""
    many = [common_pb2.AttributeFilter(field="brand", any_of=["b"])] * 10_000
    req = storefront_pb2.SearchRequest(query="shoes", page_size=5, filters=many)
    assert req.ByteSize() < 200_000
    with grpc.insecure_channel(cluster.gateway_address) as ch:
        stub = storefront_pb2_grpc.StorefrontServiceStub(ch)
        with pytest.raises(grpc.RpcError) as err:
            stub.Search(req, timeout=5)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field_violations(err.value) == ["filters"]


def test_calls_without_a_deadline_get_the_default_budget(client: StorefrontClient) -> None:
    """Every client we did not write sets no deadline by default; that must just work."""
    search = client.stub.Search(storefront_pb2.SearchRequest(query="shoes", page_size=5))
    assert len(search.page.item_ids) == 5
    assert not any(s.degraded for s in search.stages)
    rec = client.stub.Recommend(storefront_pb2.RecommendRequest(user_id="u", page_size=5))
    assert len(rec.page.item_ids) == 5


def test_too_short_deadline_is_deadline_exceeded(
    cluster: Cluster, client: StorefrontClient
) -> None:
    req = storefront_pb2.RecommendRequest(user_id="u", page_size=5)
    with pytest.raises(grpc.RpcError) as err:
        client.stub.Recommend(req, timeout=0.003)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    # the gateway survives and answers the next request
    assert len(client.recommend("u", page_size=3, timeout_s=5).page.item_ids) == 3


def _metric(text: str, name: str) -> float:
    total = 0.0
    for m in re.finditer(rf'^{name}{{[^}}]*model="fine_ranker"[^}}]*}} ([0-9.e+]+)$', text, re.M):
        total += float(m.group(1))
    return total


def test_triton_dynamic_batching_merges_concurrent_requests(
    cluster: Cluster, tiny_artifacts: Artifacts
) -> None:
    # 16 callers at once on two cores: the gateway's admission control may refuse some with
    # a retry delay; a patient client honours it until its 10 s deadline, and every request
    # must still be answered
    client = StorefrontClient(cluster.gateway_address, attempts=100)
    before = cluster.triton_metrics()
    req0, exec0 = (
        _metric(before, "nv_inference_request_success"),
        _metric(before, "nv_inference_exec_count"),
    )
    users, _ = tiny_artifacts.users()
    n = 48
    gate = threading.Barrier(16)

    def one(i: int) -> int:
        if i < 16:
            gate.wait()
        return len(client.recommend(users[i % len(users)], page_size=5, timeout_s=10).page.item_ids)

    with ThreadPoolExecutor(16) as pool:
        assert all(k == 5 for k in pool.map(one, range(n)))
    after = cluster.triton_metrics()
    requests = _metric(after, "nv_inference_request_success") - req0
    executions = _metric(after, "nv_inference_exec_count") - exec0
    assert requests >= n, "the fine ranker did not run on Triton for every request"
    assert executions < requests, f"no batching: {executions} executions for {requests} requests"


def test_page_views_basic_drops_internals_and_explains_debug_keeps_both(
    cluster: Cluster, known_user: tuple[str, np.ndarray], tiny_artifacts: Artifacts
) -> None:
    stub = storefront_pb2_grpc.StorefrontServiceStub(grpc.insecure_channel(cluster.gateway_address))
    user, history = known_user
    pages = {
        view: stub.Recommend(
            storefront_pb2.RecommendRequest(user_id=user, page_size=8, view=view), timeout=10
        ).page
        for view in (
            storefront_pb2.PAGE_VIEW_UNSPECIFIED,
            storefront_pb2.PAGE_VIEW_BASIC,
            storefront_pb2.PAGE_VIEW_DEBUG,
        )
    }
    v1, basic, debug = pages.values()
    assert len(v1.sources) == 8 and len(v1.fine_scores) == 8 and not v1.reasons  # as in v1
    assert len(basic.reasons) == 8 and len(basic.titles) == 8
    assert not basic.sources and not basic.recall_scores and not basic.fine_scores
    assert len(debug.reasons) == 8 and len(debug.sources) == 8 and len(debug.coarse_scores) == 8
    recent = set(history.tolist())
    because = [r for r in basic.reasons if r.code == storefront_pb2.REASON_CODE_BECAUSE_YOU_VIEWED]
    assert because and all(set(r.evidence_item_ids) <= recent for r in because)
    search = stub.Search(
        storefront_pb2.SearchRequest(
            query="shoes", page_size=5, view=storefront_pb2.PAGE_VIEW_BASIC
        ),
        timeout=10,
    ).page
    assert len(search.reasons) == len(search.item_ids) and not search.blurbs
    with_blurbs = stub.Search(
        storefront_pb2.SearchRequest(query="shoes", page_size=5, include_blurbs=True), timeout=10
    ).page
    assert len(with_blurbs.blurbs) == len(with_blurbs.item_ids) == 5
    catalog = tiny_artifacts.catalog
    for item, blurb in zip(with_blurbs.item_ids, with_blurbs.blurbs, strict=True):
        own = item_sentences(catalog, catalog.row(item))  # the generated shop: brand, category
        assert blurb and all(part in own for part in blurb.replace(". ", ".\n").split("\n"))
    with pytest.raises(grpc.RpcError) as err:
        stub.Recommend(
            storefront_pb2.RecommendRequest(user_id=user, page_size=8, view=7), timeout=10
        )
    assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert field_violations(err.value) == ["view"]
