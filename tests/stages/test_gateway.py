from __future__ import annotations

import numpy as np
import pytest

from sluice.artifacts import Artifacts
from sluice.core.errors import DeadlineExceeded, InvalidArgument, Unavailable
from sluice.core.stage import StageResult
from sluice.data.filters import AttributeFilter
from sluice.domain import Budget, Candidates, RankContext, StageName, Surface
from sluice.embed.text import MiniLMEncoder
from sluice.gateway.pipeline import (
    STAGE_DEGRADED,
    Gateway,
    QueryEncoder,
    _scores_of,
)
from sluice.gateway.spelling import Speller
from sluice.gateway.stages import LocalStage
from sluice.gateway.tokens import PageTokens
from sluice.gateway.users import UserHistory, item_attributes
from sluice.state.store import InMemoryStateStore


class Down:
    """A stage that cannot be reached."""

    def __init__(self, stage: StageName, why: str) -> None:
        self.stage = stage
        self.why = why

    def call(self, ctx: RankContext, cands: Candidates | None, budget: Budget) -> StageResult:
        raise Unavailable(self.why)


@pytest.fixture(scope="module")
def gateway(
    local_stages: dict[StageName, LocalStage], tiny_artifacts: Artifacts, encoder: MiniLMEncoder
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
    result = gateway.recommend(user_id=users[0], page_size=10, deadline_s=30.0)
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


def _forge(payload: str) -> str:
    """A token a client could build without the key: the payload and a guessed MAC."""
    import base64

    def b64(b: bytes) -> str:
        return base64.urlsafe_b64encode(b).decode().rstrip("=")

    return f"{b64(payload.encode())}.{b64(bytes(16))}"


FP = "0123456789ab"


@pytest.mark.parametrize(
    "token",
    [
        "garbage!",
        "a.b.c",
        "x" * 500,
        _forge(f"2147483648.{FP}"),
        _forge(f"1e30.{FP}"),
        _forge(f"Infinity.{FP}"),
        _forge(f"1.5.{FP}"),
        _forge(f"3000.{FP}"),
        _forge('{"o": 10, "f": "0123456789ab"}'),
    ],
)
def test_forged_or_malformed_page_tokens_are_invalid_argument(token: str) -> None:
    tokens = PageTokens([b"k1"], max_offset=1000)
    with pytest.raises(InvalidArgument) as err:
        tokens.decode(token, FP)
    assert err.value.field_path == "page_token"


def test_page_tokens_rotate_and_bound_offsets() -> None:
    old, new = PageTokens([b"old"], 1000), PageTokens([b"new", b"old"], 1000)
    issued = old.encode(20, FP)
    assert new.decode(issued, FP) == 20  # the old key still verifies while it is listed
    assert new.decode(new.encode(30, FP), FP) == 30
    with pytest.raises(InvalidArgument):
        PageTokens([b"new"], 1000).decode(issued, FP)  # retired key
    with pytest.raises(InvalidArgument):
        new.decode(new.encode(5000, FP), FP)  # signed, but beyond any page
    with pytest.raises(InvalidArgument):
        new.decode(issued, "ba9876543210")  # another request's token


def test_page_tokens_are_bound_to_the_request(gateway: Gateway) -> None:
    first = gateway.search(query="running shoes", page_size=5)
    second = gateway.search(query="running shoes", page_size=5, page_token=first.next_page_token)
    assert not set(first.candidates.item_ids) & set(second.candidates.item_ids)
    with pytest.raises(InvalidArgument) as err:
        gateway.search(query="yoga", page_size=5, page_token=first.next_page_token)
    assert err.value.field_path == "page_token"


def test_validation(gateway: Gateway) -> None:
    cases = [
        (lambda: gateway.search(query="  ", page_size=5), "query"),
        (lambda: gateway.search(query="q" * 513, page_size=5), "query"),
        (lambda: gateway.search(query="shoes", page_size=0), "page_size"),
        (lambda: gateway.search(query="shoes", user_id="u" * 257, page_size=5), "user_id"),
        (
            lambda: gateway.recommend(
                user_id="u", filters=(AttributeFilter("weight", any_of=("1",)),), page_size=5
            ),
            "filters[0].field",
        ),
        (
            lambda: gateway.recommend(
                user_id="u",
                filters=(AttributeFilter("price_cents", max=float("nan")),),
                page_size=5,
            ),
            "filters[0].max",
        ),
        (
            lambda: gateway.recommend(user_id="u", surface=Surface.SIMILAR_ITEMS, page_size=5),
            "context_item_id",
        ),
        (lambda: gateway.recommend(user_id="u", surface=7, page_size=5), "surface"),
    ]
    for call, field in cases:
        with pytest.raises(InvalidArgument) as err:
            call()
        assert err.value.field_path == field


def test_a_cancelled_call_stops_before_the_next_stage(
    local_stages: dict[StageName, LocalStage], tiny_artifacts: Artifacts, encoder: MiniLMEncoder
) -> None:
    from sluice.core.errors import Cancelled
    from sluice.domain import Cancellation

    cancellation = Cancellation()

    class HangUpAfterRecall:
        stage = StageName.RECALL

        def call(self, ctx: RankContext, cands: Candidates | None, budget: Budget) -> StageResult:
            result = local_stages[StageName.RECALL].call(ctx, cands, budget)
            cancellation.cancel()  # the caller hangs up while recall runs
            return result

    gw = Gateway(
        local_stages | {StageName.RECALL: HangUpAfterRecall()},
        tiny_artifacts.catalog,
        UserHistory.from_artifacts(tiny_artifacts, InMemoryStateStore()),
        QueryEncoder(encoder.encode),
    )
    with pytest.raises(Cancelled, match="before coarse"):
        gw.recommend(user_id="u", page_size=5, cancellation=cancellation)


def test_deadline_too_short(gateway: Gateway) -> None:
    with pytest.raises(DeadlineExceeded):
        gateway.recommend(user_id="u", page_size=5, deadline_s=0.001)


def test_fine_outage_degrades_and_is_counted(
    local_stages: dict[StageName, LocalStage], tiny_artifacts: Artifacts, encoder: MiniLMEncoder
) -> None:
    down = local_stages | {StageName.FINE_RANK: Down(StageName.FINE_RANK, "triton is down")}
    store = InMemoryStateStore()
    gw = Gateway(
        down,
        tiny_artifacts.catalog,
        UserHistory.from_artifacts(tiny_artifacts, store),
        QueryEncoder(encoder.encode),
    )
    users, _ = tiny_artifacts.users()
    counter = STAGE_DEGRADED.labels("fine", "UNAVAILABLE")
    before = counter._value.get()
    result = gw.recommend(user_id=users[3], page_size=8)
    assert counter._value.get() == before + 1
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


def test_query_encoder_is_safe_across_threads() -> None:
    """Handler threads share the cache; evictions between a lookup and its use must not fail
    (the old OrderedDict version raised KeyError here, which became INTERNAL)."""
    import sys
    import threading

    qe = QueryEncoder(lambda texts: np.full((1, 4), float(len(texts[0])), np.float32), size=2)
    keys = [f"q{'x' * i}" for i in range(6)]
    errors: list[BaseException] = []

    def hammer(seed: int) -> None:
        rng = np.random.default_rng(seed)
        try:
            for _ in range(3000):
                key = keys[int(rng.integers(len(keys)))]
                assert qe(key)[0] == len(key)
        except BaseException as err:
            errors.append(err)

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible
    try:
        threads = [threading.Thread(target=hammer, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(old)
    assert errors == []


@pytest.mark.parametrize("with_fallback", [True, False])
def test_recall_outage_serves_the_gateways_fallback(
    local_stages: dict[StageName, LocalStage],
    tiny_artifacts: Artifacts,
    encoder: MiniLMEncoder,
    with_fallback: bool,
) -> None:
    from sluice.data.filters import AttributeFilter
    from sluice.domain import Source
    from sluice.gateway.fallback import FallbackRecall

    a = tiny_artifacts
    gw = Gateway(
        local_stages | {StageName.RECALL: Down(StageName.RECALL, "recall is down")},
        a.catalog,
        UserHistory.from_artifacts(a, InMemoryStateStore()),
        QueryEncoder(encoder.encode),
        fallback=FallbackRecall.from_artifacts(a) if with_fallback else None,
    )
    users, histories = a.users()
    brand = a.catalog.brands[int(np.bincount(a.catalog.brand_codes).argmax())]
    only = (AttributeFilter("brand", any_of=(brand,)),)
    if not with_fallback:
        with pytest.raises(Unavailable):
            gw.recommend(user_id=users[4], page_size=8)
        return
    result = gw.recommend(user_id=users[4], page_size=8, filters=only)
    assert len(result.candidates) == 8
    recall = result.reports[0]
    assert recall.degraded and "recall is down" in recall.degraded_reason
    assert recall.candidates_out > 8
    assert not any(r.degraded for r in result.reports[1:])  # the later stages still ran
    assert set(result.candidates.sources.tolist()) <= {Source.CO_OCCURRENCE, Source.POPULARITY}
    assert not np.isin(result.candidates.item_ids, histories[4]).any()
    rows = a.catalog.rows(result.candidates.item_ids)
    assert all(a.catalog.brand_of(r) == brand for r in rows)
    search = gw.search(query="shoes", page_size=5)
    assert len(search.candidates) == 5 and search.reports[0].degraded


def test_a_stage_refusing_work_or_the_request_degrades_the_page(
    local_stages: dict[StageName, LocalStage], tiny_artifacts: Artifacts, encoder: MiniLMEncoder
) -> None:
    """A stage at its concurrency limit (RESOURCE_EXHAUSTED), or one that refuses what the
    gateway built (INVALID_ARGUMENT downstream: settings that disagree), is the gateway's
    problem to route around, not the shopper's error."""
    import grpc

    from sluice.core.errors import ResourceExhausted, from_rpc_error

    class Refusing:
        stage = StageName.COARSE_RANK

        def call(self, ctx: RankContext, cands: Candidates | None, budget: Budget) -> StageResult:
            raise ResourceExhausted("coarse is at its concurrency limit", retry_delay_ms=20)

    gw = Gateway(
        local_stages | {StageName.COARSE_RANK: Refusing()},
        tiny_artifacts.catalog,
        UserHistory.from_artifacts(tiny_artifacts, InMemoryStateStore()),
        QueryEncoder(encoder.encode),
    )
    result = gw.recommend(user_id="u", page_size=5)
    assert len(result.candidates) == 5
    assert result.reports[1].degraded and "concurrency limit" in result.reports[1].degraded_reason

    class Refused(grpc.RpcError, grpc.Call):  # type: ignore[misc]
        """What a stub raises when the stage answered INVALID_ARGUMENT."""

        def code(self) -> grpc.StatusCode:
            return grpc.StatusCode.INVALID_ARGUMENT

        def details(self) -> str:
            return "at most 1000 ids"

        def initial_metadata(self) -> None: ...
        def trailing_metadata(self) -> None: ...
        def is_active(self) -> bool: ...  # type: ignore[empty-body]
        def time_remaining(self) -> None: ...
        def cancel(self) -> None: ...
        def add_callback(self, callback: object) -> None: ...  # type: ignore[override]

    assert isinstance(from_rpc_error(Refused(), "recall"), Unavailable)


def test_a_typo_is_searched_as_the_catalogs_word(
    local_stages: dict[StageName, LocalStage], tiny_artifacts: Artifacts, encoder: MiniLMEncoder
) -> None:
    catalog = tiny_artifacts.catalog
    store = InMemoryStateStore(item_attributes(catalog))
    speller = Speller.from_catalog(catalog)
    gateway = Gateway(
        local_stages,
        catalog,
        UserHistory.from_artifacts(tiny_artifacts, store),
        QueryEncoder(encoder.encode),
        speller=speller,
    )
    # the catalog's most used long word, with its second letter dropped
    word = max(
        (w for t in catalog.titles for w in t.lower().split() if w.isalpha() and len(w) >= 6),
        key=lambda w: sum(t.lower().split().count(w) for t in catalog.titles),
    )
    typo = word[0] + word[2:]
    assert speller.correct(typo) == word
    typed = gateway.search(query=typo, page_size=5)
    right = gateway.search(query=word, page_size=5)
    assert typed.searched_query == right.searched_query == word
    assert typed.candidates.item_ids.tolist() == right.candidates.item_ids.tolist()
