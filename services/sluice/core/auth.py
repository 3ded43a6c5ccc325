"""Who may call: storefront credentials (API keys, JWT bearers), the internal mTLS identity,
and per-client rate limits.

* :class:`StorefrontAuth` accepts an API key (``x-api-key: KEY`` or ``authorization: Bearer
  KEY``) or a JWT (``authorization: Bearer JWT``) verified with PyJWT against a JWKS file
  (signature, expiry, issuer and audience). A call without valid credentials gets
  UNAUTHENTICATED. Keys are kept only as SHA-256 digests and compared in constant time.
* :class:`RateLimits`: a token bucket per client (the key's digest, or the JWT subject);
  beyond it RESOURCE_EXHAUSTED with a RetryInfo that says when a token is back.
* :class:`PeerPolicy`: a stage service only serves peers whose client certificate (already
  verified by the TLS handshake against the internal CA) names an allowed identity.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import grpc
import jwt
from cachetools import TTLCache

from sluice.core.errors import PermissionDenied, ResourceExhausted, Unauthenticated


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


class StorefrontAuth:
    """Validates a storefront call's credentials; returns the client's identity."""

    def __init__(
        self,
        api_keys: Sequence[str] = (),
        jwks: Mapping[str, Any] | None = None,
        issuer: str | None = None,
        audience: str | None = None,
    ) -> None:
        self._keys = [_digest(k) for k in api_keys]
        self._jwks = jwt.PyJWKSet.from_dict(dict(jwks)) if jwks else None
        self._issuer = issuer
        self._audience = audience

    @classmethod
    def from_files(
        cls,
        api_keys: Sequence[str],
        jwks_file: Path | None,
        issuer: str | None,
        audience: str | None,
    ) -> StorefrontAuth:
        jwks = json.loads(jwks_file.read_text()) if jwks_file else None
        return cls(api_keys, jwks, issuer, audience)

    def identify(self, metadata: Mapping[str, str]) -> str:
        key = metadata.get("x-api-key", "")
        bearer = metadata.get("authorization", "")
        if not key and bearer[:7].lower() == "bearer ":
            token = bearer[7:].strip()
            if token.count(".") == 2 and self._jwks is not None:
                return self._verify_jwt(token)
            key = token
        if not key:
            raise Unauthenticated(
                "credentials required: an API key (x-api-key, or authorization: Bearer KEY) "
                "or a JWT (authorization: Bearer JWT)"
            )
        digest = _digest(key[:512])
        if not any(hmac.compare_digest(digest, known) for known in self._keys):
            raise Unauthenticated("unknown API key")
        return "key:" + digest.hex()[:12]

    def _verify_jwt(self, token: str) -> str:
        assert self._jwks is not None
        try:
            kid = jwt.get_unverified_header(token).get("kid")
            signing = next(k for k in self._jwks.keys if kid is None or k.key_id == kid)
            claims = jwt.decode(
                token,
                signing,
                algorithms=["RS256", "ES256", "EdDSA"],
                issuer=self._issuer,
                audience=self._audience,
                options={"require": ["exp", "sub"]},
            )
        except (jwt.PyJWTError, StopIteration) as err:
            raise Unauthenticated(f"invalid bearer token: {err or 'unknown key id'}") from err
        return "sub:" + str(claims["sub"])[:128]


class RateLimits:
    """A token bucket per client: ``rate_qps`` on average, bursts of ``burst``."""

    def __init__(self, rate_qps: float, burst: float, clients: int = 100_000) -> None:
        self.rate = rate_qps
        self.burst = burst
        self._lock = threading.Lock()
        self._buckets: TTLCache[str, tuple[float, float]] = TTLCache(
            maxsize=clients, ttl=max(60.0, burst / rate_qps)
        )

    def charge(self, client: str) -> None:
        now = time.monotonic()
        with self._lock:
            tokens, seen = self._buckets.get(client, (self.burst, now))
            tokens = min(self.burst, tokens + (now - seen) * self.rate)
            if tokens < 1.0:
                self._buckets[client] = (tokens, now)
                wait_ms = math.ceil((1.0 - tokens) / self.rate * 1000)
                raise ResourceExhausted(
                    f"rate limit of {self.rate:g} requests a second for this client",
                    retry_delay_ms=max(1, wait_ms),
                    reason="RATE_LIMITED",
                )
            self._buckets[client] = (tokens - 1.0, now)


class PeerPolicy:
    """Serve only peers whose verified client certificate names one of ``allowed``."""

    def __init__(self, allowed: Sequence[str]) -> None:
        self.allowed = frozenset(allowed)

    def check(self, context: grpc.ServicerContext) -> str:
        auth = context.auth_context()
        names = {
            v.decode(errors="replace")
            for k in ("x509_common_name", "x509_subject_alternative_name")
            for v in auth.get(k, [])
        }
        if not names:
            raise Unauthenticated("this service needs the caller's client certificate (mTLS)")
        if not names & self.allowed:
            raise PermissionDenied(f"{sorted(names)} may not call this service")
        return sorted(names & self.allowed)[0]


class Guard:
    """Everything a service checks about the caller before any work, in this order."""

    def __init__(
        self,
        peers: PeerPolicy | None = None,
        storefront: StorefrontAuth | None = None,
        rate_limits: RateLimits | None = None,
        own_credentials: frozenset[str] = frozenset(),
    ) -> None:
        """``own_credentials``: services (full names) that check credentials of their own
        (the catalog service's keys), to which the storefront check does not apply."""
        self.peers = peers
        self.storefront = storefront
        self.rate_limits = rate_limits
        self.own_credentials = own_credentials

    def check(
        self, metadata: Mapping[str, str], context: grpc.ServicerContext, service: str = ""
    ) -> None:
        if self.peers is not None:
            self.peers.check(context)
        if self.storefront is not None and service not in self.own_credentials:
            client = self.storefront.identify(metadata)
            if self.rate_limits is not None:
                self.rate_limits.charge(client)


def read(path: Path | None) -> bytes | None:
    return path.read_bytes() if path else None


def server_credentials(
    cert_file: Path, key_file: Path, client_ca_file: Path | None
) -> grpc.ServerCredentials:
    """TLS for a server; with ``client_ca_file`` it requires a client certificate signed by
    that CA (mTLS)."""
    return grpc.ssl_server_credentials(
        [(key_file.read_bytes(), cert_file.read_bytes())],
        root_certificates=read(client_ca_file),
        require_client_auth=client_ca_file is not None,
    )


def channel_credentials(
    ca_file: Path | None, cert_file: Path | None = None, key_file: Path | None = None
) -> grpc.ChannelCredentials:
    """TLS for a client, verifying the server against ``ca_file`` (the system's roots when
    None), presenting ``cert_file``/``key_file`` as its identity when given (mTLS)."""
    return grpc.ssl_channel_credentials(
        root_certificates=read(ca_file),
        private_key=read(key_file),
        certificate_chain=read(cert_file),
    )
