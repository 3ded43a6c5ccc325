"""A storefront client we did not write: Node.js with @grpc/grpc-js, against the split cluster.

It sets no deadline, has no .proto files of its own (it reads the API and the error detail
types from server reflection, v1 and v1alpha), sends int64 ids as strings, pages with the
token it was given, tracks an event, and decodes a rich error. ``npm`` installs its
dependencies (pinned in ``tests/node/package.json``) on first use.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from sluice.artifacts import Artifacts
from sluice.gateway.blurbs import item_sentences
from sluice.gateway.spelling import Speller
from sluice.launch import Cluster

pytestmark = pytest.mark.integration

NODE_DIR = Path(__file__).resolve().parents[1] / "node"


@pytest.fixture(scope="module")
def node_client() -> Path:
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("node and npm are not installed (apt-get install nodejs npm)")
    if not (NODE_DIR / "node_modules" / "@grpc" / "grpc-js").exists():
        subprocess.run(
            ["npm", "install", "--no-audit", "--no-fund", "--silent"],
            cwd=NODE_DIR,
            check=True,
            timeout=300,
        )
    return NODE_DIR / "storefront_client.js"


def run_node_client(
    client: Path, address: str, item: int, env: dict[str, str] | None = None
) -> dict[str, Any]:
    out = subprocess.run(
        ["node", str(client), address, str(item)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )
    assert out.returncode == 0, out.stderr
    report: dict[str, Any] = json.loads(out.stdout)
    return report


def check_report(report: dict[str, Any], tiny_artifacts: Artifacts, item: int) -> None:
    """What the Node.js client must have seen, in any deployment."""
    for listed in (report["services_v1"], report["services_v1alpha"]):
        assert "sluice.v1.StorefrontService" in listed
        assert "grpc.health.v1.Health" in listed
    search = report["search"]
    assert len(search["item_ids"]) == 5 and all(isinstance(i, str) for i in search["item_ids"])
    assert all(int(i) in set(tiny_artifacts.catalog.item_ids.tolist()) for i in search["item_ids"])
    assert search["stages"] == [
        "STAGE_RECALL",
        "STAGE_COARSE_RANK",
        "STAGE_FINE_RANK",
        "STAGE_RERANK",
    ]
    assert search["next_page_token"]
    assert len(report["search_page_2"]) == 5
    assert not set(report["search_page_2"]) & set(search["item_ids"])
    # "Shoess" is no catalog word: searched as the one a typo away, what the speller says
    expected = Speller.from_catalog(tiny_artifacts.catalog).correct("Shoess")
    assert expected != "Shoess" and report["typo"]["searched_query"] == expected
    assert len(report["typo"]["item_ids"]) == 5
    assert len(report["similar"]) == 4 and str(item) not in report["similar"]
    basic = report["basic"]
    assert basic["item_ids"] == report["similar"] and basic["sources"] == []
    assert basic["reasons"] == [["REASON_CODE_SIMILAR_TO", [str(item)]]] * 4
    catalog = tiny_artifacts.catalog
    for shown, blurb in zip(basic["item_ids"], basic["blurbs"], strict=True):
        own = item_sentences(catalog, catalog.row(int(shown)))  # brand and category here
        assert blurb and all(part in own for part in blurb.replace(". ", ".\n").split("\n"))
    session = report["session"]
    refinement = session["refinement"]
    assert session["first_turn"] == 1 and refinement["turn"] == 2
    assert session["searched_query"] == "shoes" and refinement["query"] == "shoes"
    # the price bound (int64: a string), beside the session's topic filter when it has one
    (bound,) = [f["price_cents"]["max"] for f in refinement["item_filters"] if "price_cents" in f]
    first = catalog.price_cents[catalog.rows([int(i) for i in session["first"]])]
    refined = catalog.price_cents[catalog.rows([int(i) for i in session["refined"]])]
    assert session["refined"] and int(bound) < np.median(first) and refined.max() <= int(bound)
    assert report["track"] == ["EVENT_STATUS_ACCEPTED"]
    error = report["error"]
    assert error["code"] == "INVALID_ARGUMENT"
    assert "type.googleapis.com/google.rpc.BadRequest" in error["details"]
    assert error["field_violations"] == ["page_size"]
    assert len(error["request_id"]) == 16


def test_a_nodejs_client_with_no_deadline_and_reflected_protos(
    cluster: Cluster, tiny_artifacts: Artifacts, node_client: Path
) -> None:
    item = int(tiny_artifacts.catalog.item_ids[5])
    report = run_node_client(node_client, cluster.gateway_address, item)
    check_report(report, tiny_artifacts, item)
