"""kill -9 an ingesting process repeatedly; every acknowledged event must survive.

The worker (``python -m sluice.events.bench worker``) ingests from several
threads and prints each acknowledged event id. It is SIGKILLed mid-stream,
restarted (it recovers from the log on start) and killed again; a torn
record is appended after each kill, as a power loss might leave. Then the
state is recovered once more and checked: every acked id is there, and every
logged event was applied exactly once.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import redis

from sluice.events import bench

KILLS = 3


@pytest.mark.parametrize("store", ["memory", "redis"])
def test_no_acknowledged_event_is_lost_across_kill_9(
    store: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    redis_url = None
    if store == "redis":
        client: redis.Redis = request.getfixturevalue("redis_client")  # flushed
        kwargs = client.connection_pool.connection_kwargs
        redis_url = f"redis://{kwargs['host']}:{kwargs['port']}/0"
    rng = random.Random(5)
    cmd = bench.worker_command(tmp_path / "log", redis_url)
    acked: set[str] = set()
    for _ in range(KILLS):
        got = bench.ingest_then_kill(cmd, rng.randint(1000, 3000))
        assert len(got) >= 1000
        acked |= got
        bench.tear_tail(tmp_path / "log", rng)  # and a torn write on top of the kill
    lost, logged, applied, _ = bench.verify(tmp_path / "log", redis_url, acked)
    assert lost == 0
    assert logged >= len(acked)
    assert applied == logged  # every logged event applied exactly once
