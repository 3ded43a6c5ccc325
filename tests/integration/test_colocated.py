"""The one-machine deployment: the gateway runs the four stages itself, beside Triton."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest

from sluice.artifacts import Artifacts
from sluice.client import StorefrontClient
from sluice.embed.onnx import query_encoder
from sluice.eval.served import in_process_gateway, local_stages
from sluice.gateway.pipeline import QueryEncoder
from sluice.launch import Cluster
from tests.integration.conftest import running_cluster

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def colocated(
    tiny_artifacts: Artifacts, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    yield from running_cluster(tiny_artifacts, tmp_path_factory.mktemp("colocated"), "local")


def test_local_stages_answer_as_the_stage_logic_does(
    colocated: Cluster, tiny_artifacts: Artifacts
) -> None:
    """Only Triton and the gateway run, and every page equals the in-process cascade's (the
    same stage objects; the ranker on Triton instead of in process)."""
    assert set(colocated.processes) == {"triton", "gateway"}
    client = StorefrontClient(colocated.gateway_address)
    a = tiny_artifacts
    reference = in_process_gateway(a, local_stages(a), QueryEncoder(query_encoder(a.root).encode))
    users, histories = a.users()
    active = [u for u, h in zip(users, histories, strict=True) if len(h) >= 3][:6]
    for user in active:
        served = client.recommend(user, page_size=10, timeout_s=10)
        assert [s.degraded for s in served.stages] == [False] * 4
        assert [s.candidates_in > 0 for s in served.stages] == [True] * 4
        expected = reference.recommend(user, 1, 0, (), 10, "", 10.0)
        assert list(served.page.item_ids) == expected.candidates.item_ids.tolist()
    for title in a.catalog.titles[:4]:
        query = " ".join(title.split()[:2])
        served = client.search(query, user_id=active[0], page_size=10, timeout_s=10)
        expected = reference.search(query, active[0], (), 10, "", 10.0)
        assert list(served.page.item_ids) == expected.candidates.item_ids.tolist()
        assert np.isin(served.page.item_ids, a.catalog.item_ids).all()
