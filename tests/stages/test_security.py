"""Who may call: TLS and mTLS identities, storefront keys and JWTs, per-client rate limits."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import jwt
import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from sluice.builds import LoadedBuilds
from sluice.common.v1 import common_pb2
from sluice.core.auth import (
    Guard,
    PeerPolicy,
    RateLimits,
    StorefrontAuth,
    channel_credentials,
    server_credentials,
)
from sluice.core.errors import ResourceExhausted, Unauthenticated
from sluice.core.server import ServerOptions, ServiceSpec, bind
from sluice.core.stage import StageLimits, StageServicer
from sluice.data.catalog import Catalog
from sluice.launch import ClusterTls
from sluice.rerank.engine import RerankEngine
from sluice.rerank.service import BINDING
from sluice.rerank.v2 import rerank_pb2

REQUEST = rerank_pb2.RankCandidatesRequest(
    candidates=common_pb2.Candidates(item_ids=[1, 2], scores=[2, 1], sources=[1, 1]),
    max_candidates=2,
)


@pytest.fixture(scope="module")
def stage(certs: ClusterTls) -> Iterator[int]:
    """A stage service on mTLS that serves only the gateway's identity."""
    engine = RerankEngine(Catalog.from_columns([1, 2], ["a", "b"]), np.eye(2, dtype=np.float32))
    servicer = StageServicer(BINDING, StageLimits(10, 1.0), LoadedBuilds.fixed(engine))
    options = ServerOptions(
        credentials=server_credentials(certs.server_cert, certs.server_key, certs.ca),
        guard=Guard(peers=PeerPolicy(["sluice-gateway"])),
    )
    svc = bind(ServiceSpec("rerank", servicer.add_to), options)
    svc.set_serving(True)
    yield svc.port
    svc.stop(0.1)


def _call(channel: grpc.Channel) -> grpc.StatusCode:
    rpc = channel.unary_unary(
        BINDING.path,
        request_serializer=rerank_pb2.RankCandidatesRequest.SerializeToString,
        response_deserializer=rerank_pb2.RankCandidatesResponse.FromString,
    )
    try:
        rpc(REQUEST, timeout=5)
    except grpc.RpcError as err:
        return err.code()
    return grpc.StatusCode.OK


def _tls(port: int, certs: ClusterTls, who: str | None) -> grpc.Channel:
    root = certs.ca.parent
    cert, key = (root / f"{who}.pem", root / f"{who}.key") if who else (None, None)
    return grpc.secure_channel(f"127.0.0.1:{port}", channel_credentials(certs.ca, cert, key))


def test_a_stage_serves_only_the_internal_identity(stage: int, certs: ClusterTls) -> None:
    with _tls(stage, certs, "gateway_client") as ch:
        assert _call(ch) == grpc.StatusCode.OK
    with _tls(stage, certs, "intruder") as ch:  # signed by the same CA, another identity
        assert _call(ch) == grpc.StatusCode.PERMISSION_DENIED
    with _tls(stage, certs, None) as ch:  # no client certificate: the handshake fails
        assert _call(ch) == grpc.StatusCode.UNAVAILABLE
    with grpc.insecure_channel(f"127.0.0.1:{stage}") as ch:  # plaintext
        assert _call(ch) == grpc.StatusCode.UNAVAILABLE


# -- storefront credentials ------------------------------------------------------------------
@pytest.fixture(scope="module")
def signer() -> tuple[rsa.RSAPrivateKey, dict[str, object]]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    public.update({"kid": "k1", "use": "sig", "alg": "RS256"})
    return key, {"keys": [public]}


def _token(key: rsa.RSAPrivateKey, **claims: object) -> str:
    base: dict[str, object] = {
        "sub": "shop-42",
        "iss": "https://auth.example",
        "aud": "sluice",
        "exp": int(time.time()) + 60,
    }
    return jwt.encode({**base, **claims}, key, algorithm="RS256", headers={"kid": "k1"})


def test_api_keys_and_jwt_bearers(signer: tuple[rsa.RSAPrivateKey, dict[str, object]]) -> None:
    key, jwks = signer
    auth = StorefrontAuth(["key-one", "key-two"], jwks, "https://auth.example", "sluice")
    assert auth.identify({"x-api-key": "key-two"}).startswith("key:")
    assert auth.identify({"authorization": "Bearer key-one"}).startswith("key:")
    assert auth.identify({"authorization": f"Bearer {_token(key)}"}) == "sub:shop-42"
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    rejected = [
        {},
        {"x-api-key": "key-three"},
        {"authorization": "Basic a2V5LW9uZQ=="},
        {"authorization": f"Bearer {_token(key, exp=int(time.time()) - 10)}"},  # expired
        {"authorization": f"Bearer {_token(key, aud='someone-else')}"},
        {"authorization": f"Bearer {_token(key, iss='https://evil.example')}"},
        {"authorization": f"Bearer {_token(other)}"},  # signed by a key not in the JWKS
        {"authorization": "Bearer " + jwt.encode({"sub": "x"}, None, algorithm="none")},
    ]
    for metadata in rejected:
        with pytest.raises(Unauthenticated):
            auth.identify(metadata)


def test_rate_limits_per_client() -> None:
    limits = RateLimits(rate_qps=10, burst=3)
    for _ in range(3):
        limits.charge("a")
    with pytest.raises(ResourceExhausted) as err:
        limits.charge("a")
    assert 1 <= err.value.retry_delay_ms <= 100
    limits.charge("b")  # another client has its own bucket


def test_settings_wire_it_up(certs: ClusterTls, tmp_path: Path) -> None:
    from sluice.config import GatewaySettings, RerankSettings

    gw = GatewaySettings(api_keys=["k"], rate_limit_qps=5)
    guard = gw.guard()
    assert guard is not None and guard.storefront is not None and guard.rate_limits is not None
    assert GatewaySettings().guard() is None  # development without keys: open
    with pytest.raises(ValueError, match="production"):
        GatewaySettings(profile="production")
    stage_settings = RerankSettings(
        tls_cert_file=certs.server_cert,
        tls_key_file=certs.server_key,
        tls_client_ca_file=certs.ca,
        allowed_peers=["sluice-gateway"],
    )
    options = stage_settings.server_options()
    assert options.credentials is not None and options.guard is not None
    with pytest.raises(ValueError, match="go together"):
        RerankSettings(tls_cert_file=certs.server_cert)


def test_a_tls_service_answers_plain_health_probes_on_its_health_port(certs: ClusterTls) -> None:
    """Kubernetes' gRPC probes cannot speak TLS: they check the plaintext health port, which
    serves nothing but health."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from sluice.launch import free_port

    servicer = StageServicer(BINDING, StageLimits(10, 1.0), LoadedBuilds())
    options = ServerOptions(
        credentials=server_credentials(certs.server_cert, certs.server_key, None),
        health_port=free_port(),
    )
    svc = bind(ServiceSpec("rerank", servicer.add_to), options)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{options.health_port}") as ch:
            check = health_pb2_grpc.HealthStub(ch).Check
            status = check(health_pb2.HealthCheckRequest(), timeout=5).status
            assert status == health_pb2.HealthCheckResponse.NOT_SERVING
            svc.set_serving(True)
            status = check(health_pb2.HealthCheckRequest(), timeout=5).status
            assert status == health_pb2.HealthCheckResponse.SERVING
            watch = health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest(), timeout=5)
            assert next(watch).status == health_pb2.HealthCheckResponse.SERVING  # and Watch
            watch.cancel()
            assert _call(ch) == grpc.StatusCode.UNIMPLEMENTED  # only health lives there
    finally:
        svc.stop(0.1)
