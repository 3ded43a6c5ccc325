"""The merchant's rules through the real cascade (the tiny build's engines in process).

Blocked content must never reach a page: on the home and similar-items surfaces, in search,
on every page a client can page to, and when re-ranking (or recall) is down and the gateway
applies the rules itself. Every block here is chosen so that the same requests without
rules do show it: otherwise the test could not fail.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from sluice.artifacts import Artifacts
from sluice.core.stage import StageResult
from sluice.domain import Budget, Candidates, RankContext, StageName, Surface
from sluice.embed.text import MiniLMEncoder
from sluice.gateway.fallback import FallbackRecall
from sluice.gateway.pipeline import Gateway, PageResult, QueryEncoder
from sluice.gateway.spelling import Speller
from sluice.gateway.stages import LocalStage
from sluice.gateway.users import UserHistory, item_attributes
from sluice.rules import GUARD_DROPPED, RulesWatcher, write_rules
from sluice.state.store import InMemoryStateStore
from tests.stages.test_gateway import Down

PAGES = 4  # pages followed per request (page size 10)
DEADLINE_S = 30.0  # no stage runs late on a busy host: a degraded page must mean "down"


class Shop:
    """The tiny build's catalog, and what the rules below block in it."""

    def __init__(self, a: Artifacts, baseline: Gateway) -> None:
        self.catalog = c = a.catalog
        self.users, self.histories = a.users()
        shown = Counter[int]()
        for user in self.users[:40]:
            for item in _all_pages(
                lambda t, u=user: baseline.recommend(
                    user_id=u, page_size=10, page_token=t, deadline_s=DEADLINE_S
                )
            ):
                shown[item] += 1
        rows = c.rows(np.fromiter(shown, np.int64))
        by_brand = Counter(c.brands[c.brand_codes[r]] for r in rows.tolist())
        by_category = Counter(c.categories[c.category_codes[r]] for r in rows.tolist())
        # the most shown brand and category without rules: blocking them must change pages
        self.brand = by_brand.most_common(1)[0][0]
        self.category = next(k for k, _ in by_category.most_common() if k != "")
        self.adult = next(k for k, _ in by_category.most_common() if k != self.category)
        others = [i for i, _ in shown.most_common() if self._free(i)]
        self.items = others[:5]  # the most shown items of neither
        self.pinned = others[5]
        self.similar_brand = next(b for b, _ in by_brand.most_common() if b != self.brand)

    def _free(self, item: int) -> bool:
        row = self.catalog.row(item)
        return self.catalog.brands[
            self.catalog.brand_codes[row]
        ] != self.brand and self.catalog.categories[self.catalog.category_codes[row]] not in (
            self.category,
            self.adult,
        )

    def spec(self, version: str = "v1") -> dict[str, Any]:
        return {
            "version": version,
            "blocked": {
                "item_ids": self.items,
                "brands": [self.brand],
                "categories": [self.category],
            },
            "surfaces": {"similar_items": {"brands": [self.similar_brand]}},
            "age_restricted_categories": [self.adult],
            "queries": {"blocked": ["forbidden thing"], "rewrites": {"zzqx": "kitchen"}},
            "pins": [{"item_id": self.pinned, "position": 1, "surfaces": ["home"]}],
        }

    def blocked(
        self, item_ids: np.ndarray, surface: Surface = Surface.HOME, adult_ok: bool = False
    ) -> list[int]:
        c = self.catalog
        rows = c.rows(item_ids)
        out = []
        for item, row in zip(item_ids.tolist(), rows.tolist(), strict=True):
            brand, category = c.brands[c.brand_codes[row]], c.categories[c.category_codes[row]]
            if (
                item in self.items
                or brand == self.brand
                or category == self.category
                or (category == self.adult and not adult_ok)
                or (surface is Surface.SIMILAR_ITEMS and brand == self.similar_brand)
            ):
                out.append(item)
        return out


def _all_pages(call: Any) -> Iterator[int]:
    token = ""
    for _ in range(PAGES):
        result: PageResult = call(token)
        yield from result.candidates.item_ids.tolist()
        token = result.next_page_token
        if not token:
            return


def _gateway(
    stages: Mapping[StageName, Any],
    a: Artifacts,
    encoder: MiniLMEncoder,
    rules: RulesWatcher | None,
) -> Gateway:
    store = InMemoryStateStore(item_attributes(a.catalog))
    return Gateway(
        stages,
        a.catalog,
        UserHistory.from_artifacts(a, store),
        QueryEncoder(encoder.encode),
        fallback=FallbackRecall.from_artifacts(a),
        rules=rules,
    )


@pytest.fixture(scope="module")
def baseline(
    local_stages: dict[StageName, LocalStage], tiny_artifacts: Artifacts, encoder: MiniLMEncoder
) -> Gateway:
    return _gateway(local_stages, tiny_artifacts, encoder, None)


@pytest.fixture(scope="module")
def shop(tiny_artifacts: Artifacts, baseline: Gateway) -> Shop:
    return Shop(tiny_artifacts, baseline)


@pytest.fixture(scope="module")
def rules_file(shop: Shop, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("rules") / "rules.json"
    write_rules(path, shop.spec())
    return path


Make = Callable[..., Gateway]


@pytest.fixture(scope="module")
def ruled(
    local_stages: dict[StageName, LocalStage],
    tiny_artifacts: Artifacts,
    encoder: MiniLMEncoder,
    rules_file: Path,
) -> Make:
    """A gateway over the tiny build's stages reading a rules file (default: the module's),
    with one stage ``down`` if asked, or other ``stages``."""

    def make(
        down: StageName | None = None,
        path: Path | None = None,
        stages: Mapping[StageName, Any] | None = None,
    ) -> Gateway:
        chosen = dict(stages or local_stages)
        if down is not None:
            chosen[down] = Down(down, "down for the test")
        return _gateway(chosen, tiny_artifacts, encoder, RulesWatcher(path or rules_file))

    return make


def _requests(shop: Shop) -> list[tuple[Surface, bool, Any]]:
    """(surface, adult_ok, call(gateway, token)) for every path a page can take."""
    out: list[tuple[Surface, bool, Any]] = []
    for user in shop.users[:20]:
        out.append(
            (
                Surface.HOME,
                False,
                lambda g, t, u=user: g.recommend(
                    user_id=u, page_size=10, page_token=t, deadline_s=DEADLINE_S
                ),
            )
        )
    c = shop.catalog
    anchors = [int(i) for i in c.item_ids[:: max(1, len(c) // 15)]]
    for item in anchors:  # the anchor itself may be blocked: its neighbours still are not shown
        out.append(
            (
                Surface.SIMILAR_ITEMS,
                False,
                lambda g, t, i=item: g.recommend(
                    user_id="",
                    surface=Surface.SIMILAR_ITEMS,
                    context_item_id=i,
                    page_size=10,
                    page_token=t,
                    deadline_s=DEADLINE_S,
                ),
            )
        )
    blocked_rows = [r for r in range(len(c)) if shop.blocked(c.item_ids[r : r + 1])]
    for row in blocked_rows[:: max(1, len(blocked_rows) // 15)]:  # queries that find blocked items
        query = " ".join(c.titles[row].split()[:3])
        out.append(
            (
                Surface.UNSPECIFIED,
                False,
                lambda g, t, q=query: g.search(
                    query=q, page_size=10, page_token=t, deadline_s=DEADLINE_S
                ),
            )
        )
    return out


def _shown_blocked(gateway: Gateway, shop: Shop) -> tuple[list[int], int]:
    bad: list[int] = []
    shown = 0
    for surface, adult_ok, call in _requests(shop):
        items = np.fromiter(_all_pages(lambda t, c=call: c(gateway, t)), np.int64)
        shown += len(items)
        bad += shop.blocked(items, surface, adult_ok)
    return bad, shown


def test_without_rules_these_requests_show_the_content_the_rules_block(
    baseline: Gateway, shop: Shop
) -> None:
    bad, shown = _shown_blocked(baseline, shop)
    assert len(bad) > 50, f"only {len(bad)} of {shown}: the blocks would not be tested"


@pytest.mark.parametrize("down", [None, StageName.RERANK, StageName.RECALL, StageName.FINE_RANK])
def test_blocked_content_never_appears_on_any_path(
    down: StageName | None,
    shop: Shop,
    ruled: Make,
) -> None:
    gateway = ruled(down)
    bad, shown = _shown_blocked(gateway, shop)
    assert shown > 500
    assert not bad, f"{len(bad)} blocked items shown with {down} down: {bad[:10]}"


@pytest.mark.parametrize("down", [None, StageName.RERANK])
def test_a_pin_holds_its_position_once_and_on_every_layout(
    down: StageName | None,
    shop: Shop,
    ruled: Make,
) -> None:
    gateway = ruled(down)
    users = [u for u, h in zip(shop.users, shop.histories, strict=True) if shop.pinned not in h][
        :10
    ]
    for user in users:
        first = gateway.recommend(user_id=user, page_size=10, deadline_s=DEADLINE_S)
        assert first.candidates.item_ids[0] == shop.pinned
        assert first.rules_version == "v1"
        second = gateway.recommend(
            user_id=user, page_size=10, page_token=first.next_page_token, deadline_s=DEADLINE_S
        )
        assert shop.pinned not in second.candidates.item_ids.tolist()
        degraded = {r.stage for r in first.reports if r.degraded}
        assert degraded == ({down} if down else set())


def test_age_restricted_categories_show_only_with_the_flag(
    shop: Shop,
    ruled: Make,
) -> None:
    gateway = ruled()
    c = shop.catalog
    adult_rows = np.flatnonzero(
        np.asarray([c.categories[k] for k in c.category_codes]) == shop.adult
    )

    def adult(page: PageResult) -> int:
        rows = c.rows(page.candidates.item_ids)
        return sum(c.categories[c.category_codes[r]] == shop.adult for r in rows.tolist())

    hidden = shown = 0
    for row in adult_rows[:10].tolist():
        query = " ".join(c.titles[row].split()[:3])
        without = gateway.search(query=query, page_size=10, deadline_s=DEADLINE_S)
        with_flag = gateway.search(
            query=query, page_size=10, include_age_restricted=True, deadline_s=DEADLINE_S
        )
        hidden += adult(without)
        shown += adult(with_flag)
        assert not shop.blocked(with_flag.candidates.item_ids, Surface.UNSPECIFIED, adult_ok=True)
    assert hidden == 0 and shown > 0


def test_boosts_raise_a_brands_share(
    shop: Shop,
    tmp_path: Path,
    ruled: Make,
) -> None:
    c = shop.catalog
    path = tmp_path / "rules.json"
    write_rules(path, {"version": "plain"})
    gateway = ruled(path=path)

    def share(brand: str) -> float:
        items = [
            i
            for u in shop.users[:20]
            for i in gateway.recommend(
                user_id=u, page_size=10, deadline_s=DEADLINE_S
            ).candidates.item_ids.tolist()
        ]
        return sum(c.brands[c.brand_codes[c.row(i)]] == brand for i in items) / len(items)

    before = share(shop.similar_brand)
    write_rules(
        path, {"version": "boosted", "boosts": [{"brand": shop.similar_brand, "weight": 1.0}]}
    )
    assert gateway.rules is not None and gateway.rules.check()
    after = share(shop.similar_brand)
    assert after > before + 0.1, (before, after)


def test_blocked_and_rewritten_queries(
    ruled: Make,
) -> None:
    gateway = ruled()
    blocked = gateway.search(
        query="  Where to buy a Forbidden  THING? ", page_size=10, deadline_s=DEADLINE_S
    )
    assert blocked.query_blocked and len(blocked.candidates) == 0 and not blocked.reports
    assert blocked.rules_version == "v1" and not blocked.next_page_token
    rewritten = gateway.search(query="ZZQX knives", page_size=10, deadline_s=DEADLINE_S)
    assert rewritten.searched_query == "kitchen knives" and not rewritten.query_blocked
    plain = gateway.search(query="kitchen knives", page_size=10, deadline_s=DEADLINE_S)
    assert rewritten.candidates.item_ids.tolist() == plain.candidates.item_ids.tolist()


def test_the_query_list_reads_the_query_as_typed_and_as_corrected(
    ruled: Make, tiny_artifacts: Artifacts, tmp_path: Path
) -> None:
    """Spelling would change a word the merchant blocks or rewrites (such words are often
    ones the catalog never uses): the list is checked before it, and again after."""
    catalog = tiny_artifacts.catalog
    speller = Speller.from_catalog(catalog)
    counts = Counter(w for t in catalog.titles for w in set(t.lower().split()) if w.isalpha())
    first, second = [w for w, n in counts.most_common() if len(w) >= 6][:2]
    typo_1, typo_2 = first[0] + first[2:], second[0] + second[2:]
    assert speller.correct(typo_1) == first and speller.correct(typo_2) == second
    path = tmp_path / "rules.json"
    write_rules(
        path,
        {
            "version": "typos",
            "queries": {"blocked": [typo_1, second], "rewrites": {"zzqxx": "kitchen"}},
        },
    )
    gateway = replace(ruled(path=path), speller=speller)
    typed = gateway.search(query=typo_1, page_size=10, deadline_s=DEADLINE_S)
    assert typed.query_blocked and typed.searched_query == typo_1  # as typed
    corrected = gateway.search(query=typo_2, page_size=10, deadline_s=DEADLINE_S)
    assert corrected.query_blocked and corrected.searched_query == second  # as corrected
    rewritten = gateway.search(query="zzqxx knives", page_size=10, deadline_s=DEADLINE_S)
    assert rewritten.searched_query == "kitchen knives"  # rewritten, not corrected first
    assert gateway.search(query=first, page_size=10, deadline_s=DEADLINE_S).candidates.item_ids.size


def test_a_changed_rules_file_applies_to_the_next_request_without_a_restart(
    shop: Shop,
    tmp_path: Path,
    ruled: Make,
) -> None:
    path = tmp_path / "rules.json"
    write_rules(path, {"version": "open"})
    gateway = ruled(path=path)
    user = shop.users[0]
    before = gateway.recommend(user_id=user, page_size=10, deadline_s=DEADLINE_S)
    assert before.rules_version == "open"
    victims = before.candidates.item_ids[:3].tolist()
    write_rules(path, {"version": "closed", "blocked": {"item_ids": victims}})
    assert gateway.rules is not None and gateway.rules.check()  # what the watcher thread runs
    after = gateway.recommend(user_id=user, page_size=10, deadline_s=DEADLINE_S)
    assert after.rules_version == "closed"
    assert not set(victims) & set(after.candidates.item_ids.tolist())
    assert len(after.candidates) == 10


class Unaware:
    """A stage that ignores the rules the context carries (an older version, say)."""

    def __init__(self, inner: LocalStage) -> None:
        self.inner = inner
        self.stage = inner.stage

    def call(self, ctx: RankContext, cands: Candidates | None, budget: Budget) -> StageResult:
        bare = replace(ctx, filters=(), exclude_item_ids=np.zeros(0, np.int64), pins=(), boosts=())
        return self.inner.call(bare, cands, budget)


def test_with_rerank_down_the_gateway_applies_the_rules_itself(
    local_stages: dict[StageName, LocalStage], shop: Shop, ruled: Make
) -> None:
    """Recall ignores the rules and re-ranking is down: only the gateway stands between the
    blocked items and the page, and the pages stay full."""
    stages: dict[StageName, Any] = {
        **local_stages,
        StageName.RECALL: Unaware(local_stages[StageName.RECALL]),
        StageName.COARSE_RANK: Unaware(local_stages[StageName.COARSE_RANK]),
    }
    gateway = ruled(StageName.RERANK, stages=stages)
    dropped = GUARD_DROPPED._value.get()
    bad, shown = _shown_blocked(gateway, shop)
    assert shown > 500 and not bad, bad[:10]
    pages = [
        gateway.recommend(user_id=u, page_size=10, deadline_s=DEADLINE_S) for u in shop.users[:10]
    ]
    assert all(len(p.candidates) == 10 for p in pages)
    assert GUARD_DROPPED._value.get() == dropped  # removed before the page was cut, not after
