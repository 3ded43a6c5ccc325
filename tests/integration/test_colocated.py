"""The two layouts answer alike: every stage its own service, or the stages in the gateway.

``cluster`` (the split layout: Triton and five services) and ``colocated`` (the one-machine
layout: Triton and one gateway that runs the four stages itself) serve the same build; every
kind of storefront request must get the same page from both.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

from sluice.artifacts import Artifacts
from sluice.client import StorefrontClient
from sluice.common.v1 import common_pb2
from sluice.config import GatewaySettings
from sluice.domain import StageName
from sluice.embed.onnx import query_encoder
from sluice.eval.served import in_process_gateway, local_stages
from sluice.gateway.pipeline import QueryEncoder
from sluice.launch import Cluster
from sluice.v1 import storefront_pb2
from tests.integration.conftest import running_cluster

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def colocated(
    tiny_artifacts: Artifacts, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    yield from running_cluster(tiny_artifacts, tmp_path_factory.mktemp("colocated"), "local")


@pytest.fixture(scope="module")
def one_process(
    tiny_artifacts: Artifacts, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    """The one-machine layout without Triton: the gateway runs the build's model.onnx on ONNX
    Runtime itself (``SLUICE_FINE_BACKEND=onnx``)."""
    base = tmp_path_factory.mktemp("one-process")
    yield from running_cluster(tiny_artifacts, base, "local", fine_backend="onnx")


def _requests(a: Artifacts) -> dict[str, Callable[[StorefrontClient], Any]]:
    """One of every kind of request, by name; each takes a client and returns the response."""
    users, histories = a.users()
    known = next(u for u, h in zip(users, histories, strict=True) if len(h) >= 5)
    catalog = a.catalog
    query = " ".join(catalog.titles[7].split()[:2])
    anchor = int(catalog.item_ids[int(np.flatnonzero(catalog.in_stock)[11])])
    category = catalog.categories[int(np.bincount(catalog.category_codes).argmax())]
    price = int(np.median(catalog.price_cents))
    typed = [
        common_pb2.ItemFilter(price_cents=common_pb2.Int64Range(max=price)),
        common_pb2.ItemFilter(in_stock=True),
    ]
    legacy = [common_pb2.AttributeFilter(field="category", any_of=[category])]
    similar = storefront_pb2.SURFACE_SIMILAR_ITEMS

    def search(**kw: Any) -> Callable[[StorefrontClient], Any]:
        return lambda c: c.stub.Search(
            storefront_pb2.SearchRequest(query=query, page_size=10, **kw), timeout=10
        )

    def recommend(**kw: Any) -> Callable[[StorefrontClient], Any]:
        return lambda c: c.stub.Recommend(
            storefront_pb2.RecommendRequest(page_size=10, **kw), timeout=10
        )

    def second_page(first: Callable[[StorefrontClient], Any], **kw: Any) -> Any:
        def call(c: StorefrontClient) -> Any:
            token = first(c).next_page_token
            assert token, "no second page to compare"
            req = storefront_pb2.RecommendRequest(page_size=10, page_token=token, **kw)
            return c.stub.Recommend(req, timeout=10)

        return call

    return {
        "search, anonymous": search(),
        "search, known user": search(user_id=known),
        "search, legacy filters": search(filters=legacy),
        "search, typed filters": search(item_filters=typed),
        "home, known user": recommend(user_id=known),
        "home, newcomer": recommend(user_id="never-seen-before"),
        "similar items, with history": recommend(
            user_id=known, surface=similar, context_item_id=anchor
        ),
        "similar items, anonymous": recommend(surface=similar, context_item_id=anchor),
        "home, typed and legacy filters": recommend(
            user_id=known, item_filters=typed, filters=legacy
        ),
        "home, second page": second_page(recommend(user_id=known), user_id=known),
        "similar items, anonymous, second page": second_page(
            recommend(surface=similar, context_item_id=anchor),
            surface=similar,
            context_item_id=anchor,
        ),
    }


def _assert_same_pages(first: Cluster, second: Cluster, artifacts: Artifacts) -> None:
    """Every kind of request gets the same page, scores and stage counts from both."""
    one, other = StorefrontClient(first.gateway_address), StorefrontClient(second.gateway_address)
    for name, request in _requests(artifacts).items():
        a, b = request(one), request(other)
        assert len(a.page.item_ids) > 0, name
        assert list(a.page.item_ids) == list(b.page.item_ids), name
        np.testing.assert_allclose(a.page.scores, b.page.scores, rtol=1e-5, err_msg=name)
        np.testing.assert_allclose(a.page.fine_scores, b.page.fine_scores, rtol=1e-5, err_msg=name)
        assert bool(a.next_page_token) == bool(b.next_page_token), name  # keys differ
        assert [s.degraded for s in a.stages] == [False] * 4, name
        assert [s.degraded for s in b.stages] == [False] * 4, name
        assert [(s.candidates_in, s.candidates_out) for s in a.stages] == [
            (s.candidates_in, s.candidates_out) for s in b.stages
        ], name


def test_both_layouts_return_identical_pages(
    cluster: Cluster, colocated: Cluster, tiny_artifacts: Artifacts
) -> None:
    assert set(colocated.processes) == {"triton", "gateway"}
    _assert_same_pages(cluster, colocated, tiny_artifacts)


def test_the_gateway_alone_ranks_as_triton_does(
    colocated: Cluster, one_process: Cluster, tiny_artifacts: Artifacts
) -> None:
    """The same model file on ONNX Runtime in the gateway and on Triton: the same pages and
    scores, and one process instead of two."""
    assert set(one_process.processes) == {"gateway"}
    _assert_same_pages(colocated, one_process, tiny_artifacts)


def test_anonymous_similar_items_run_the_ranker_in_both_layouts(
    cluster: Cluster, colocated: Cluster, tiny_artifacts: Artifacts
) -> None:
    """The fine stage sees the anchor item in the split layout too (it once did not, and kept
    the coarse order there while the one-machine gateway ran the model)."""
    anchor = int(tiny_artifacts.catalog.item_ids[3])
    req = storefront_pb2.RecommendRequest(
        page_size=10, surface=storefront_pb2.SURFACE_SIMILAR_ITEMS, context_item_id=anchor
    )
    for c in (cluster, colocated):
        resp = StorefrontClient(c.gateway_address).stub.Recommend(req, timeout=10)
        fine = np.asarray(resp.page.fine_scores)
        coarse = np.asarray(resp.page.coarse_scores)
        assert len(fine) == 10 and np.isfinite(fine).all()
        assert not np.allclose(fine, coarse), "the fine stage kept the coarse scores"


def test_local_stages_answer_as_the_stage_logic_does(
    colocated: Cluster, tiny_artifacts: Artifacts
) -> None:
    """The one-machine gateway's pages equal the in-process cascade's (the same engines through
    the same wiring; the ranker on Triton instead of in process)."""
    client = StorefrontClient(colocated.gateway_address)
    a = tiny_artifacts
    # queries encoded at the gateway's precision (the same settings, read from this
    # environment as the cluster's gateway reads it)
    precision = GatewaySettings().query_encoder
    encoder = query_encoder(a.root, precision=precision)
    reference = in_process_gateway(a, local_stages(a), QueryEncoder(encoder.encode))
    users, histories = a.users()
    active = [u for u, h in zip(users, histories, strict=True) if len(h) >= 3][:6]
    for user in active:
        served = client.recommend(user, page_size=10, timeout_s=10)
        assert [s.degraded for s in served.stages] == [False] * 4
        assert [s.candidates_in > 0 for s in served.stages] == [True] * 4
        expected = reference.recommend(user_id=user, page_size=10, deadline_s=10.0)
        assert list(served.page.item_ids) == expected.candidates.item_ids.tolist()
        assert StageName.FINE_RANK in expected.stage_scores
    for title in a.catalog.titles[:4]:
        query = " ".join(title.split()[:2])
        served = client.search(query, user_id=active[0], page_size=10, timeout_s=10)
        expected = reference.search(query=query, user_id=active[0], page_size=10, deadline_s=10.0)
        assert list(served.page.item_ids) == expected.candidates.item_ids.tolist()
        assert np.isin(served.page.item_ids, a.catalog.item_ids).all()
