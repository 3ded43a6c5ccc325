"""Explanations: each item's reason comes from the signals that ranked it, and is faithful.

Faithfulness: take away the evidence a reason cites (the recent items of BECAUSE_YOU_VIEWED
or SIMILAR_TO, the matched terms of MATCHES_QUERY) and ask again: the item must move down
by 3 or more places or leave the page. The reasons are computed before, from the ranking
signals; the ablation only checks them.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping

import numpy as np
import pytest

from sluice.artifacts import Artifacts
from sluice.domain import StageName, Surface
from sluice.embed.text import MiniLMEncoder
from sluice.gateway.explain import Explainer, ReasonCode, query_terms
from sluice.gateway.pipeline import Gateway, QueryEncoder
from sluice.gateway.stages import LocalStage

PAGE = 10
DEADLINE_S = 30.0
MOVED = 3  # places an item must fall (or leave the page) once its evidence is gone
FAITHFUL = 0.9


class Histories:
    """A user context whose histories a test can change."""

    def __init__(self, histories: Mapping[str, np.ndarray]) -> None:
        self.histories = dict(histories)

    def history(self, user_id: str, limit: int) -> np.ndarray:
        return np.asarray(self.histories.get(user_id, np.zeros(0, np.int64)))[-limit:]

    def suppressed(self, user_id: str) -> np.ndarray:
        return np.zeros(0, np.int64)


@pytest.fixture(scope="module")
def users(tiny_artifacts: Artifacts) -> Histories:
    ids, histories = tiny_artifacts.users()
    return Histories(dict(zip(ids, histories, strict=True)))


@pytest.fixture(scope="module")
def gateway(
    local_stages: dict[StageName, LocalStage],
    tiny_artifacts: Artifacts,
    encoder: MiniLMEncoder,
    users: Histories,
) -> Gateway:
    return Gateway(
        local_stages,
        tiny_artifacts.catalog,
        users,
        QueryEncoder(encoder.encode),
        explainer=Explainer.from_artifacts(tiny_artifacts),
    )


def _rank(items: list[int], item: int) -> int | None:
    return items.index(item) if item in items else None


def _moved(before: int, after: int | None) -> bool:
    return after is None or after >= before + MOVED


def test_every_item_gets_a_reason_from_a_signal_that_ranked_it(
    gateway: Gateway, tiny_artifacts: Artifacts, users: Histories
) -> None:
    catalog = tiny_artifacts.catalog
    codes: Counter[ReasonCode] = Counter()
    for user in list(users.histories)[:30]:
        page = gateway.recommend(user_id=user, page_size=PAGE, deadline_s=DEADLINE_S, explain=True)
        assert len(page.reasons) == len(page.candidates) == PAGE
        recent = set(users.history(user, 50).tolist())
        for reason in page.reasons:
            codes[reason.code] += 1
            if reason.code in (ReasonCode.BECAUSE_YOU_VIEWED, ReasonCode.SIMILAR_TO):
                assert 1 <= len(reason.evidence_item_ids) <= 4
                assert set(reason.evidence_item_ids) <= recent  # only the user's own items
            if reason.code is ReasonCode.POPULAR_IN_CATEGORY:
                assert reason.category in catalog.categories
    assert codes[ReasonCode.BECAUSE_YOU_VIEWED] > 100, codes
    anchor = int(catalog.item_ids[5])
    similar = gateway.recommend(
        user_id="",
        surface=Surface.SIMILAR_ITEMS,
        context_item_id=anchor,
        page_size=PAGE,
        deadline_s=DEADLINE_S,
        explain=True,
    )
    assert {r.code for r in similar.reasons} == {ReasonCode.SIMILAR_TO}
    assert all(r.evidence_item_ids == (anchor,) for r in similar.reasons)
    query = " ".join(catalog.titles[7].split()[:3])
    search = gateway.search(query=query, page_size=PAGE, deadline_s=DEADLINE_S, explain=True)
    matched = [r for r in search.reasons if r.code is ReasonCode.MATCHES_QUERY]
    assert matched and all(set(r.matched_terms) <= set(query.lower().split()) for r in matched)
    plain = gateway.recommend(
        user_id=next(iter(users.histories)), page_size=PAGE, deadline_s=DEADLINE_S
    )
    assert plain.reasons == []  # not asked for: not computed


def test_reasons_are_faithful_removing_the_evidence_moves_the_item_down(
    gateway: Gateway, tiny_artifacts: Artifacts, users: Histories
) -> None:
    checked = faithful = 0
    per_code: Counter[str] = Counter()
    per_code_ok: Counter[str] = Counter()
    for user in list(users.histories)[:60]:
        history = users.histories[user]
        page = gateway.recommend(user_id=user, page_size=PAGE, deadline_s=DEADLINE_S, explain=True)
        items = page.candidates.item_ids.tolist()
        for position, (item, reason) in enumerate(zip(items, page.reasons, strict=True)):
            if reason.code not in (ReasonCode.BECAUSE_YOU_VIEWED, ReasonCode.SIMILAR_TO):
                continue
            users.histories[user] = history[~np.isin(history, reason.evidence_item_ids)]
            try:
                again = gateway.recommend(user_id=user, page_size=PAGE, deadline_s=DEADLINE_S)
            finally:
                users.histories[user] = history
            ok = _moved(position, _rank(again.candidates.item_ids.tolist(), item))
            checked += 1
            faithful += ok
            per_code[reason.code.name] += 1
            per_code_ok[reason.code.name] += ok
    catalog = tiny_artifacts.catalog
    for row in range(0, len(catalog), 40):  # searches: drop the matched terms from the query
        query = " ".join(catalog.titles[row].split()[:4])
        page = gateway.search(query=query, page_size=PAGE, deadline_s=DEADLINE_S, explain=True)
        items = page.candidates.item_ids.tolist()
        for position, (item, reason) in enumerate(zip(items, page.reasons, strict=True)):
            if reason.code is not ReasonCode.MATCHES_QUERY:
                continue
            rest = [w for w in query.split() if w.lower() not in reason.matched_terms]
            if not query_terms(" ".join(rest)):
                continue  # nothing left to search: not an ablation of this item alone
            again = gateway.search(query=" ".join(rest), page_size=PAGE, deadline_s=DEADLINE_S)
            ok = _moved(position, _rank(again.candidates.item_ids.tolist(), item))
            checked += 1
            faithful += ok
            per_code["MATCHES_QUERY"] += 1
            per_code_ok["MATCHES_QUERY"] += ok
    rate = faithful / checked
    print(
        f"\nfaithfulness: {faithful}/{checked} = {rate:.3f}; "
        + ", ".join(f"{k} {per_code_ok[k]}/{n}" for k, n in per_code.items())
    )
    assert checked >= 200
    assert rate >= FAITHFUL, (rate, dict(per_code), dict(per_code_ok))
