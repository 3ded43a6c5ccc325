"""A sharded catalog answers what the whole catalog answers (sluice.recall.shards).

With flat indexes, 1, 2 and 4 shards gathered by the front return exactly the candidates,
sources and scores of one recall engine over the same build, for recommendations (with
filters, exclusions, anchors), searches and cold starts.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from sluice.artifacts import Artifacts
from sluice.build.shards import in_range_neighbours, write_shards
from sluice.config import RecallSettings
from sluice.data.filters import AttributeFilter
from sluice.domain import Budget, Candidates, Gathered, RankContext
from sluice.embed.text import MiniLMEncoder
from sluice.recall.engine import RecallEngine
from sluice.recall.loader import load
from sluice.recall.shards import ShardedRecall, ShardManifest


def _sharded_copy(tiny: Artifacts, root: Path, count: int) -> Artifacts:
    copy = root / f"shards-{count}"
    shutil.copytree(tiny.root, copy, ignore=shutil.ignore_patterns("shards"))
    artifacts = Artifacts(copy)
    write_shards(artifacts, count, "flat")
    return artifacts


@pytest.fixture(scope="module")
def sharded(
    tiny_artifacts: Artifacts, tmp_path_factory: pytest.TempPathFactory
) -> dict[int, Artifacts]:
    """Copies of the tiny build cut into 1, 2 and 4 flat shards."""
    root = tmp_path_factory.mktemp("sharded")
    return {count: _sharded_copy(tiny_artifacts, root, count) for count in (1, 2, 4)}


@pytest.fixture(scope="module")
def fronts(sharded: dict[int, Artifacts]) -> dict[int, ShardedRecall]:
    """A front over every shard of each copy, loaded as a recall process loads it."""
    out = {}
    for count, artifacts in sharded.items():
        front = load(RecallSettings(artifacts=artifacts.root, shard_addrs="local"), [])
        assert isinstance(front, ShardedRecall) and len(front.shards) == count
        out[count] = front
    return out


def _requests(tiny: Artifacts, encoder: MiniLMEncoder) -> list[RankContext]:
    catalog = tiny.catalog
    _, histories = tiny.users()
    rng = np.random.default_rng(7)
    ctxs = [RankContext()]
    for h in histories[:25]:
        ctxs.append(RankContext(history_item_ids=h, exclude_item_ids=h))
    for h in histories[25:35]:
        brand = catalog.brands[int(rng.integers(len(catalog.brands)))]
        ctxs.append(
            RankContext(
                history_item_ids=h,
                filters=(
                    AttributeFilter("brand", any_of=(brand,)),
                    AttributeFilter("price_cents", max=float(np.median(catalog.price_cents))),
                ),
            )
        )
    for item in rng.choice(catalog.item_ids, 10, replace=False):
        ctxs.append(RankContext(context_item_id=int(item), exclude_item_ids=np.array([item])))
    queries = []
    for row in rng.choice(len(catalog), 15, replace=False):
        words = catalog.titles[row].split()
        queries.append(" ".join(words[: 1 + int(rng.integers(min(3, len(words))))]))
    queries += ["the", "zzz-no-such-word"]
    vectors = encoder.encode(queries)
    ctxs += [RankContext(query=q, query_embedding=v) for q, v in zip(queries, vectors, strict=True)]
    return ctxs


def _same(a: Candidates, b: Candidates) -> bool:
    return (
        np.array_equal(a.item_ids, b.item_ids)
        and np.array_equal(a.sources, b.sources)
        and np.array_equal(a.scores, b.scores)
    )


@pytest.mark.parametrize("budget", [40, 300, 1000])
def test_shards_answer_what_the_whole_catalog_answers(
    fronts: dict[int, ShardedRecall],
    recaller: RecallEngine,
    tiny_artifacts: Artifacts,
    encoder: MiniLMEncoder,
    budget: int,
) -> None:
    ctxs = _requests(tiny_artifacts, encoder)
    differ: dict[int, int] = dict.fromkeys(fronts, 0)
    answered = 0
    for ctx in ctxs:
        whole = recaller.retrieve(ctx, Budget(budget))
        answered += len(whole) > 0  # a narrow filter may leave nothing
        for count, front in fronts.items():
            got = front.retrieve(ctx, Budget(budget))
            assert isinstance(got, Gathered) and all(s.answered for s in got.shards)
            assert len(got.shards) == count
            differ[count] += not _same(whole, got)
    assert answered >= 0.9 * len(ctxs)
    assert differ == dict.fromkeys(fronts, 0), f"of {len(ctxs)} requests"


def test_every_item_is_in_exactly_one_shard(
    sharded: dict[int, Artifacts], tiny_artifacts: Artifacts
) -> None:
    for count, artifacts in sharded.items():
        manifest = ShardManifest.load(artifacts.root)
        ids = [
            Artifacts(manifest.shard_dir(artifacts.root, i)).catalog.item_ids for i in range(count)
        ]
        assert np.array_equal(np.concatenate(ids), tiny_artifacts.catalog.item_ids)


def test_a_shard_that_fails_degrades_the_answer(
    fronts: dict[int, ShardedRecall], sharded: dict[int, Artifacts], tiny_artifacts: Artifacts
) -> None:
    """A failing shard's items are missing and it is flagged; the others still answer."""
    from sluice.core.errors import Unavailable

    class Down:
        def call(self, *args: object) -> object:
            raise Unavailable("shard is down")

    front = fronts[4]
    sick = ShardedRecall([front.shards[0], Down(), *front.shards[2:]], front.catalog_size)
    _, histories = tiny_artifacts.users()
    ctx = RankContext(history_item_ids=histories[3])
    got = sick.retrieve(ctx, Budget(200))
    assert [s.answered for s in got.shards] == [True, False, True, True]
    assert "UNAVAILABLE" in got.shards[1].error
    start, stop = ShardManifest.load(sharded[4].root).ranges[1]
    lost = tiny_artifacts.catalog.item_ids[start:stop]
    assert len(got) == 200 and not np.isin(got.item_ids, lost).any()

    with pytest.raises(Unavailable, match="no recall shard answered"):
        ShardedRecall([Down(), Down()], front.catalog_size).retrieve(ctx, Budget(10))


def test_a_shard_whose_call_runs_out_of_time_missed_the_budget(
    fronts: dict[int, ShardedRecall], tiny_artifacts: Artifacts
) -> None:
    """A shard call that ends in DEADLINE_EXCEEDED (it carries the deadline the front waits
    for, so it can notice first) is reported like a shard the front stopped waiting for."""
    from sluice.core.errors import DeadlineExceeded
    from sluice.recall.shards import MISSED_BUDGET

    class Late:
        def call(self, *args: object) -> object:
            raise DeadlineExceeded("recall ran out of time")

    front = fronts[4]
    late = ShardedRecall([front.shards[0], Late(), *front.shards[2:]], front.catalog_size)
    _, histories = tiny_artifacts.users()
    got = late.retrieve(RankContext(history_item_ids=histories[3]), Budget(200))
    assert [s.answered for s in got.shards] == [True, False, True, True]
    assert got.shards[1].error == MISSED_BUDGET
    assert len(got) == 200


def test_in_range_neighbours_keeps_order_and_scores() -> None:
    rows = np.array([[5, 1, 7, 2, -1], [9, 8, 3, -1, -1]])
    scores = np.array([[9.0, 8, 7, 6, 0], [5, 4, 3, 0, 0]], np.float32)
    got_rows, got_scores = in_range_neighbours(rows, scores, 2, 8)
    assert got_rows.tolist() == [[3, 5, 0], [1, -1, -1]]
    assert got_scores.tolist() == [[9.0, 7.0, 6.0], [3.0, 0.0, 0.0]]


def test_sizing_table_follows_the_measured_shards(
    sharded: dict[int, Artifacts], tmp_path: Path
) -> None:
    from sluice.bench.sizing import cpu_per_request, measured_bytes, plan

    artifacts = sharded[4]
    measured = measured_bytes(artifacts.root)
    n = len(artifacts.catalog)
    folders = [artifacts.root / "shards" / str(i) for i in range(4)]
    on_disk = sum(
        p.stat().st_size
        for f in folders
        for p in f.rglob("*")
        if p.is_file() and p.name != "cooc.npz"
    )
    own = sum(v for k, v in measured.items() if k.startswith("own:"))
    assert own * n == pytest.approx(on_disk)  # each item's own parts are in one shard
    load = tmp_path / "load.json"
    step = {"offered_qps": 20, "gateway": {"cpu_ms_per_request": 4.0}}
    step |= {f"shard-{i}": {"cpu_ms_per_request": 1.0} for i in range(4)}
    load.write_text(json.dumps({"services": [step]}))
    rate, cpu = cpu_per_request(load, None)
    assert rate == 20 and cpu["gateway"] == 4.0
    args = {"node_memory_gib": 64.0, "node_cores": 16, "utilization": 0.5, "rates": [1000.0]}
    small = plan(measured, cpu, n // 4, 10 * n, 2 * n, **args)
    large = plan(measured, cpu, n // 4, 100 * n, 2 * n, **args)
    assert (small["shards"], large["shards"]) == (5, 50)
    # shards of 2n items cost 8x the measured n/4 shard: 4 + 5 * 8 ms; at 50% of a core
    assert small["cpu_ms_per_request"] == pytest.approx(44.0)
    assert small["replicas"]["1000"]["cores"] == 88
    assert large["shard_gib"] > small["shard_gib"]  # whole-catalog parts grow with the catalog
    # with the engine timed at two sizes, the fixed part stays and the work follows the line
    timed = plan(measured, cpu, n // 4, 10 * n, 2 * n, **args, engine=(1.0, 3.0, n // 4, n))
    assert timed["shard_cpu_ms"] == pytest.approx(
        1.0 + 2.0 / (n - n // 4) * (2 * n - n // 4), abs=0.01
    )
