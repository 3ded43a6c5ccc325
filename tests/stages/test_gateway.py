from __future__ import annotations

import numpy as np
import pytest

from sluice.artifacts import Artifacts
from sluice.core.errors import DeadlineExceeded, InvalidArgument, Unavailable
from sluice.data.filters import AttributeFilter
from sluice.domain import Candidates, RankContext, StageName, StageReport
from sluice.embed.text import MiniLMEncoder
from sluice.gateway.pipeline import (
    Gateway,
    QueryEncoder,
    _scores_of,
    decode_page_token,
    encode_page_token,
)
from sluice.gateway.stages import LocalStages
from sluice.gateway.users import UserHistory, item_attributes
from sluice.state.store import InMemoryStateStore


class FineDown(LocalStages):
    """The real stages, except that the fine ranker is unreachable."""

    def fine(
        self, ctx: RankContext, cands: Candidates, keep: int, timeout_s: float
    ) -> tuple[Candidates, StageReport]:
        raise Unavailable("triton is down")


@pytest.fixture(scope="module")
def gateway(
    local_stages: LocalStages, tiny_artifacts: Artifacts, encoder: MiniLMEncoder
) -> Gateway:
    store = InMemoryStateStore(item_attributes(tiny_artifacts.catalog))
    return Gateway(
        local_stages,
        tiny_artifacts.catalog,
        UserHistory.from_artifacts(tiny_artifacts, store),
        QueryEncoder(encoder.encode),
    )


def test_recommend_page_and_reports(gateway: Gateway, tiny_artifacts: Artifacts) -> None:
    users, histories = tiny_artifacts.users()
    result = gateway.recommend(users[0], 1, 0, (), 10, "", 30.0)
    assert len(result.candidates) == 10
    assert [r.stage for r in result.reports] == list(StageName)[1:]
    assert not np.isin(result.candidates.item_ids, histories[0]).any()
    assert set(result.stage_scores) == {
        StageName.RECALL,
        StageName.COARSE_RANK,
        StageName.FINE_RANK,
    }
    for stage_scores in result.stage_scores.values():  # every page item passed every stage
        assert stage_scores.shape == (10,)
        assert np.isfinite(stage_scores).all()
    assert result.next_page_token


def test_stage_scores_are_looked_up_by_item() -> None:
    cands = Candidates(np.array([30, 10, 20]), np.array([0.3, 0.1, 0.2]), np.zeros(3))
    got = _scores_of(cands, np.array([20, 99, 30, 10], np.int64))
    np.testing.assert_array_equal(got[[0, 2, 3]], np.array([0.2, 0.3, 0.1], np.float32))
    assert np.isnan(got[1])
    empty = Candidates(np.zeros(0), np.zeros(0), np.zeros(0))
    assert np.isnan(_scores_of(empty, np.array([1], np.int64))).all()


def test_page_tokens_are_bound_to_the_request(gateway: Gateway) -> None:
    token = encode_page_token(10, "abc")
    assert decode_page_token(token, "abc") == 10
    with pytest.raises(InvalidArgument):
        decode_page_token(token, "other")
    first = gateway.search("running shoes", "", (), 5, "", 30.0)
    with pytest.raises(InvalidArgument) as err:
        gateway.search("yoga", "", (), 5, first.next_page_token, 30.0)
    assert err.value.field_path == "page_token"


def test_validation(gateway: Gateway) -> None:
    cases = [
        (lambda: gateway.search("  ", "", (), 5, "", 30.0), "query"),
        (lambda: gateway.search("q" * 513, "", (), 5, "", 30.0), "query"),
        (lambda: gateway.search("shoes", "", (), 0, "", 30.0), "page_size"),
        (
            lambda: gateway.recommend(
                "u", 1, 0, (AttributeFilter("weight", any_of=("1",)),), 5, "", 1.0
            ),
            "filters[0].field",
        ),
        (lambda: gateway.recommend("u", 2, 0, (), 5, "", 30.0), "context_item_id"),
    ]
    for call, field in cases:
        with pytest.raises(InvalidArgument) as err:
            call()
        assert err.value.field_path == field


def test_deadline_too_short(gateway: Gateway) -> None:
    with pytest.raises(DeadlineExceeded):
        gateway.recommend("u", 1, 0, (), 5, "", 0.001)


def test_fine_outage_degrades(
    local_stages: LocalStages, tiny_artifacts: Artifacts, encoder: MiniLMEncoder
) -> None:
    s = local_stages
    down = FineDown(s.recaller, s.coarse_ranker, s.fine_stage, s.reranker)
    store = InMemoryStateStore()
    gw = Gateway(
        down,
        tiny_artifacts.catalog,
        UserHistory.from_artifacts(tiny_artifacts, store),
        QueryEncoder(encoder.encode),
    )
    users, _ = tiny_artifacts.users()
    result = gw.recommend(users[3], 1, 0, (), 8, "", 30.0)
    assert len(result.candidates) == 8
    fine = result.reports[2]
    assert fine.degraded and "triton" in fine.degraded_reason
    assert StageName.FINE_RANK not in result.stage_scores


def test_query_encoder_caches(encoder: MiniLMEncoder) -> None:
    calls = []

    def counting(texts: list[str]) -> np.ndarray:
        calls.append(texts)
        return encoder.encode(texts)

    qe = QueryEncoder(counting, size=2)
    a = qe("Running Shoes")
    b = qe("running   shoes")
    assert np.array_equal(a, b) and len(calls) == 1
