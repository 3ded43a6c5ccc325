"""Fuzzing every method of every service over real gRPC, as a client we did not write would.

Each method gets seeded cases through a raw bytes-in, bytes-out channel (no client-side
checks): generated messages and byte-level mutations of well-formed requests
(:mod:`tests.integration.fuzzing`). Every answer must be a defined status (OK or a clear
error): never INTERNAL or UNKNOWN, never later than its deadline, and every process must be
alive at the end.

``SLUICE_FUZZ_CASES`` sets the cases per method (default 300; ``make fuzz`` runs 2000).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from sluice.artifacts import Artifacts
from sluice.convert import context_to_proto
from sluice.domain import Budget, Candidates, RankContext, RequestKind, Surface
from sluice.launch import Cluster
from sluice.v1 import storefront_pb2
from sluice.wiring import STAGES
from tests.integration.conftest import running_cluster
from tests.integration.fuzzing import fuzz

pytestmark = pytest.mark.integration

CASES = int(os.environ.get("SLUICE_FUZZ_CASES", "300"))
STOREFRONT = storefront_pb2.DESCRIPTOR.services_by_name["StorefrontService"]


@pytest.fixture(scope="module")
def fuzzed(
    tiny_artifacts: Artifacts, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    """Its own cluster: the fuzzer's Track calls must not change other tests' pages."""
    yield from running_cluster(tiny_artifacts, tmp_path_factory.mktemp("fuzz"))


# -- what to call ---------------------------------------------------------------------------
def _methods() -> dict[str, tuple[str, str, type[Any]]]:
    """name -> (process, path, request class) for all 7 methods."""
    out: dict[str, tuple[str, str, type[Any]]] = {}
    for m in STOREFRONT.methods:
        cls = getattr(storefront_pb2, m.input_type.name)
        out[m.name] = ("gateway", f"/{STOREFRONT.full_name}/{m.name}", cls)
    for e in STAGES:
        b = e.binding()
        out[f"{e.name}.{b.method.name}"] = (e.name, b.path, b.request)
    return out


METHODS = _methods()


def _seeds(name: str, a: Artifacts) -> list[bytes]:
    """Well-formed requests of the method, to mutate."""
    users, histories = a.users()
    ids = a.catalog.item_ids
    if name == "Search":
        reqs: list[Any] = [
            storefront_pb2.SearchRequest(query=a.catalog.titles[3], page_size=10),
            storefront_pb2.SearchRequest(query="red shoes", user_id=users[0], page_size=5),
        ]
    elif name == "Recommend":
        reqs = [
            storefront_pb2.RecommendRequest(user_id=users[1], page_size=10),
            storefront_pb2.RecommendRequest(
                surface=storefront_pb2.SURFACE_SIMILAR_ITEMS,
                context_item_id=int(ids[4]),
                page_size=5,
            ),
        ]
    elif name == "Track":
        reqs = [
            storefront_pb2.TrackRequest(
                events=[
                    storefront_pb2.Event(
                        event_id=uuid.uuid4().hex,
                        user_id="fuzz-user",
                        item_id=int(ids[i]),
                        type=storefront_pb2.EVENT_TYPE_CLICK,
                    )
                    for i in range(3)
                ]
            )
        ]
    elif name == "DeleteUser":
        reqs = [storefront_pb2.DeleteUserRequest(user_id="fuzz-user")]
    else:
        stage = next(e for e in STAGES if name.startswith(f"{e.name}."))
        ctx = RankContext(
            RequestKind.RECOMMEND,
            Surface.HOME,
            history_item_ids=np.asarray(histories[2], np.int64),
            exclude_item_ids=np.asarray(histories[2], np.int64),
        )
        cands = Candidates(ids[:50], np.linspace(1, 0, 50), np.ones(50))
        binding = stage.binding()
        reqs = [
            binding.encode(
                context_to_proto(ctx), None if binding.retrieves else cands, Budget(20, offset=0)
            )
        ]
    return [r.SerializeToString() for r in reqs]


# -- the test ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(METHODS))
def test_no_input_gets_internal_or_unknown_or_hangs(
    name: str, fuzzed: Cluster, tiny_artifacts: Artifacts
) -> None:
    process, path, cls = METHODS[name]
    address = fuzzed.gateway_address if process == "gateway" else fuzzed.address(process)
    codes, bad = fuzz(address, path, cls, _seeds(name, tiny_artifacts), CASES)
    print(f"\n{name}: {sum(codes.values())} cases, {dict(codes)}")
    assert not bad, f"{len(bad)} bad answers, first: {bad[:5]}"
    assert sum(codes.values()) >= CASES
    dead = [p for p, proc in fuzzed.processes.items() if proc.poll() is not None]
    assert not dead, f"died under fuzzing: {dead}"
