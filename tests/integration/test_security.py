"""A cluster on TLS everywhere: the storefront needs an API key, the stages and Triton serve
only their internal callers (mTLS), and a foreign client still gets through properly."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from sluice.artifacts import Artifacts
from sluice.common.v1 import common_pb2
from sluice.launch import Cluster, ClusterTls
from sluice.v1 import storefront_pb2, storefront_pb2_grpc
from tests.integration.conftest import running_cluster
from tests.integration.test_foreign_client import check_report, node_client, run_node_client

pytestmark = pytest.mark.integration
__all__ = ["node_client"]  # the fixture, shared with the plaintext test

KEY = "test-storefront-key"


@pytest.fixture(scope="module")
def secured(
    tiny_artifacts: Artifacts, certs: ClusterTls, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    base = tmp_path_factory.mktemp("secured")
    yield from running_cluster(tiny_artifacts, base, tls=certs, api_keys=(KEY,))


def _storefront(c: Cluster, certs: ClusterTls) -> storefront_pb2_grpc.StorefrontServiceStub:
    creds = grpc.ssl_channel_credentials(certs.ca.read_bytes())
    return storefront_pb2_grpc.StorefrontServiceStub(grpc.secure_channel(c.gateway_address, creds))


def test_the_storefront_needs_credentials(secured: Cluster, certs: ClusterTls) -> None:
    stub = _storefront(secured, certs)
    req = storefront_pb2.RecommendRequest(user_id="u", page_size=5)
    for metadata in [(), (("x-api-key", "wrong"),), (("authorization", "Bearer wrong"),)]:
        with pytest.raises(grpc.RpcError) as err:
            stub.Recommend(req, timeout=10, metadata=metadata)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    resp = stub.Recommend(req, timeout=10, metadata=(("x-api-key", KEY),))
    assert len(resp.page.item_ids) == 5
    # every hop behind it (gateway -> stages, fine -> Triton) is mTLS, and none degraded
    assert [s.degraded for s in resp.stages] == [False] * 4
    with grpc.insecure_channel(secured.gateway_address) as plain:
        with pytest.raises(grpc.RpcError) as err:
            storefront_pb2_grpc.StorefrontServiceStub(plain).Recommend(req, timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_stages_refuse_anyone_but_the_gateway(secured: Cluster, certs: ClusterTls) -> None:
    from sluice.core.auth import channel_credentials
    from sluice.wiring import BY_NAME

    binding = BY_NAME["rerank"].binding()
    intruder = channel_credentials(
        certs.ca, certs.ca.parent / "intruder.pem", certs.ca.parent / "intruder.key"
    )
    with grpc.secure_channel(secured.address("rerank"), intruder) as ch:
        with pytest.raises(grpc.RpcError) as err:
            ch.unary_unary(binding.path)(b"", timeout=5)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with grpc.insecure_channel(secured.address("recall")) as ch:
        with pytest.raises(grpc.RpcError) as err:
            ch.unary_unary(BY_NAME["recall"].binding().path)(b"", timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    triton = f"127.0.0.1:{secured.ports.triton_grpc}"
    live = "/inference.GRPCInferenceService/ServerLive"  # Triton speaks only mTLS too
    with grpc.insecure_channel(triton) as ch, pytest.raises(grpc.RpcError) as err:
        ch.unary_unary(live)(b"", timeout=5)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    # Triton checks the client certificate against the CA but keeps no list of identities:
    # any certificate the internal CA signed gets in (on Kubernetes a NetworkPolicy admits
    # only the fine pods). This pins that limit down, so that docs/reliability.md stays true.
    with grpc.secure_channel(triton, intruder) as ch:
        assert ch.unary_unary(live)(b"", timeout=10) is not None


def test_a_nodejs_client_over_tls_with_a_key(
    secured: Cluster, certs: ClusterTls, tiny_artifacts: Artifacts, node_client: Path
) -> None:
    item = int(tiny_artifacts.catalog.item_ids[5])
    env = {"SLUICE_CA_FILE": str(certs.ca), "SLUICE_API_KEY": KEY}
    report = run_node_client(node_client, secured.gateway_address, item, env)
    check_report(report, tiny_artifacts, item)


def test_delete_user_is_authenticated_and_erases_the_build_history(
    secured: Cluster, certs: ClusterTls, tiny_artifacts: Artifacts
) -> None:
    users, histories = tiny_artifacts.users()
    user = users[-1]  # no other test of this cluster uses this shopper
    history = set(histories[-1].tolist())
    stub = _storefront(secured, certs)
    key = (("x-api-key", KEY),)
    with pytest.raises(grpc.RpcError) as err:
        stub.DeleteUser(storefront_pb2.DeleteUserRequest(user_id=user), timeout=10)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    req = storefront_pb2.RecommendRequest(user_id=user, page_size=10)
    before = stub.Recommend(req, timeout=10, metadata=key)
    assert not set(before.page.item_ids) & history  # known: what they have is excluded
    assert set(before.page.sources) != {common_pb2.CANDIDATE_SOURCE_POPULARITY}
    for _ in range(2):  # idempotent
        stub.DeleteUser(storefront_pb2.DeleteUserRequest(user_id=user), timeout=10, metadata=key)
    after = stub.Recommend(req, timeout=10, metadata=key)
    # a stranger now: the cold-start page, and nothing of their history is used
    assert set(after.page.sources) == {common_pb2.CANDIDATE_SOURCE_POPULARITY}
    with pytest.raises(grpc.RpcError) as err:
        stub.DeleteUser(storefront_pb2.DeleteUserRequest(user_id=""), timeout=10, metadata=key)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
