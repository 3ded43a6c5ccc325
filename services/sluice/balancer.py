"""Load balancing: the gateway's client-side balancing over stage replicas, and the HTTP/2
load balancer (HAProxy) the launcher puts in front of several gateways.

**Stage addresses** (``SLUICE_GATEWAY_<STAGE>_ADDR``) are gRPC targets:

* ``host:port`` — one address, exactly as before: gRPC's default ``pick_first``, no retries
  (a failed call degrades the page).
* ``ipv4:127.0.0.1:5001,127.0.0.1:5002`` (or ``ipv6:[::1]:5001,[::1]:5002``), or the bare
  list ``127.0.0.1:5001,127.0.0.1:5002`` (read as ``ipv4:``) — a fixed set of replicas.
* ``dns:///recall-headless:50061`` — every A/AAAA record of the name (a Kubernetes headless
  Service), re-resolved by gRPC when a connection drops.

A target with several replicas gets a service config (:func:`service_config`):
``round_robin`` over the replicas, gRPC client-side health checking (a replica is picked only
while its health service reports the stage's service name SERVING, which the bootstrap sets
once the stage is warm, and which turns NOT_SERVING when it drains), and a retry policy for
the stage call, which is idempotent: UNAVAILABLE (a replica that died mid-call, or one that
lacks the request's build) is retried up to ``attempts`` times in all, each attempt picked by
``round_robin`` and so on another replica, with 10 to 50 ms of jittered back-off, within the
caller's deadline (gRPC's deadline covers every attempt). Retry throttling stops retrying
while most calls fail (every replica down: the page degrades at once instead of thrice).
Hedging is not used: gRPC's C core (Python's grpcio) does not implement ``hedgingPolicy``.

**Which replicas a build swap waits for** (:func:`replica_addresses`): a fixed list is every
address in it; a ``dns:`` name is every address it resolves to when the gateway checks. A
replica that joins later starts on the store's current build; should the gateway still pin
a request to the previous build, that replica answers UNAVAILABLE and the retry policy sends
the call to another replica.
"""

from __future__ import annotations

import ipaddress
import json
import socket
from dataclasses import dataclass
from typing import Any, Literal

TargetKind = Literal["single", "static", "dns"]

RETRY_BACKOFF = ("0.01s", "0.05s")
"""The first and the longest pause before a retry (gRPC jitters each between 0 and it)."""
MAX_ATTEMPTS = 5
"""gRPC caps ``maxAttempts`` at 5."""


@dataclass(frozen=True)
class StageTarget:
    """A stage address setting, parsed: the gRPC target to dial and what it names."""

    address: str
    """As configured."""
    target: str
    """The gRPC target to dial (a bare list becomes ``ipv4:``/``ipv6:``)."""
    kind: TargetKind
    addresses: tuple[str, ...] = ()
    """``static``: the replicas' ``host:port``."""
    host: str = ""
    """``dns``: the name to resolve."""
    port: int = 0

    @property
    def balanced(self) -> bool:
        """Several replicas (or a name that may resolve to several): round_robin, health
        checks and retries. A single ``host:port`` keeps gRPC's defaults."""
        return self.kind != "single"

    @property
    def authority(self) -> str:
        """The ``:authority`` (and TLS name) of calls: the DNS name, or the first replica of a
        fixed list (gRPC would otherwise send the whole list)."""
        if self.kind == "static":
            return self.addresses[0]
        if self.kind == "dns":
            return f"{self.host}:{self.port}"
        return self.address


def _split_host_port(text: str, what: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{what}: {text!r} is not host:port with a port from 1 to 65535")
    return host, int(port)


def _literal(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host[1:-1] if host.startswith("[") else host)
    except ValueError:
        return None


def parse_target(address: str) -> StageTarget:
    """Read a stage address setting; ``ValueError`` says what is wrong with it."""
    text = address.strip()
    if not text:
        raise ValueError("an empty stage address")
    scheme, colon, rest = text.partition(":")
    if colon and scheme in ("ipv4", "ipv6"):
        return _static(text, rest.split(","), scheme)
    if colon and scheme == "dns":
        return _dns(text, rest)
    if "," in text:  # a bare list of literal addresses
        parts = text.split(",")
        hosts = [_split_host_port(p.strip(), "stage address")[0] for p in parts]
        literals = [_literal(h) for h in hosts]
        if any(lit is None for lit in literals) or (
            len({lit.version for lit in literals if lit is not None}) != 1
        ):
            raise ValueError(
                f"{address!r}: a list of replicas must be IP literals of one family "
                "(ipv4:a:p,b:p); for a name with several addresses use dns:///name:port"
            )
        family = "ipv4" if literals[0] is not None and literals[0].version == 4 else "ipv6"
        return _static(f"{family}:" + ",".join(p.strip() for p in parts), parts, family)
    return StageTarget(address=text, target=text, kind="single")


def _static(target: str, parts: list[str], family: str) -> StageTarget:
    addresses = []
    for part in parts:
        host, port = _split_host_port(part.strip(), f"{family} target")
        literal = _literal(host)
        if literal is None or literal.version != (4 if family == "ipv4" else 6):
            raise ValueError(f"{family} target: {host!r} is not an {family} literal")
        if family == "ipv6" and not host.startswith("["):
            raise ValueError(f"ipv6 target: write {host!r} in brackets, [{host}]:{port}")
        addresses.append(f"{host}:{port}")
    if not addresses:
        raise ValueError(f"{target!r} names no address")
    return StageTarget(target, target, "static", tuple(addresses))


def _dns(target: str, rest: str) -> StageTarget:
    # dns:host:port, dns:///host:port or dns://authority/host:port
    path = rest.split("/", 3)[-1] if rest.startswith("//") else rest
    host, port = _split_host_port(path, "dns target")
    return StageTarget(target, target, "dns", host=host, port=port)


def replica_addresses(target: StageTarget) -> list[str]:
    """Every replica's ``host:port`` now: a fixed list as given, a DNS name resolved (each
    address once), a single address as it is."""
    if target.kind == "static":
        return list(target.addresses)
    if target.kind == "single":
        return [target.address]
    infos = socket.getaddrinfo(target.host, target.port, type=socket.SOCK_STREAM)
    found: list[str] = []
    for family, _type, _proto, _name, sockaddr in infos:
        host = str(sockaddr[0])
        address = (
            f"[{host}]:{target.port}" if family == socket.AF_INET6 else f"{host}:{target.port}"
        )
        if address not in found:
            found.append(address)
    return found


def service_config(service: str, attempts: int) -> dict[str, Any]:
    """The gRPC service config of a balanced stage channel (see the module's docs)."""
    if not 1 <= attempts <= MAX_ATTEMPTS:
        raise ValueError(f"attempts must be 1 to {MAX_ATTEMPTS}")
    method: dict[str, Any] = {"name": [{"service": service}]}
    if attempts > 1:
        method["retryPolicy"] = {
            "maxAttempts": attempts,
            "initialBackoff": RETRY_BACKOFF[0],
            "maxBackoff": RETRY_BACKOFF[1],
            "backoffMultiplier": 2,
            "retryableStatusCodes": ["UNAVAILABLE"],
        }
    return {
        "loadBalancingConfig": [{"round_robin": {}}],
        "healthCheckConfig": {"serviceName": service},
        "methodConfig": [method],
        # a retry costs a token, a success gives back a tenth: retries stop after ~50 failures
        # in a row (every replica down) and resume as calls succeed again
        "retryThrottling": {"maxTokens": 100, "tokenRatio": 0.1},
    }


def channel_options(
    target: StageTarget,
    service: str,
    attempts: int,
    base: list[tuple[str, Any]],
    tls: bool = False,
) -> list[tuple[str, Any]]:
    """``base`` (a single address: unchanged), or ``base`` with the balancing service config,
    retries on, and (fixed lists under TLS) the first replica as the authority."""
    if not target.balanced:
        return list(base)
    options = [(k, v) for k, v in base if k != "grpc.enable_retries"]
    options += [
        ("grpc.service_config", json.dumps(service_config(service, attempts))),
        ("grpc.service_config_disable_resolution", 1),  # no service config from DNS TXT
        ("grpc.enable_retries", 1),
    ]
    if tls and target.kind == "static":
        options.append(("grpc.default_authority", target.authority))
    return options


# -- the HTTP/2 load balancer in front of the gateways -------------------------------------


def _hpack_literal(name: bytes, value: bytes) -> bytes:
    """An HPACK "literal header field without indexing, new name", no Huffman (RFC 7541
    6.2.2): needs no encoder state, so the probe's bytes are the same on every connection."""
    if len(name) > 126 or len(value) > 126:
        raise ValueError("header too long for a one-byte length")
    return b"\x00" + bytes([len(name)]) + name + bytes([len(value)]) + value


def _h2_frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
    return (
        len(payload).to_bytes(3, "big") + bytes([kind, flags]) + stream.to_bytes(4, "big") + payload
    )


def grpc_health_probe(service: str, authority: str = "127.0.0.1") -> bytes:
    """The bytes of one gRPC ``grpc.health.v1.Health/Check`` call for ``service`` over a new
    plaintext HTTP/2 connection: the client preface, an empty SETTINGS frame, the request's
    HEADERS and one DATA frame (the length-prefixed ``HealthCheckRequest``) ending the stream.

    HAProxy 2.6's ``http-check send`` cannot carry a body with NUL bytes, and every gRPC
    message starts with some; its ``tcp-check send-binary`` sends these bytes as they are,
    and ``tcp-check expect binary`` looks for the SERVING answer (:data:`SERVING_REPLY`)."""
    encoded = service.encode()
    if len(encoded) > 127:
        raise ValueError("service name too long")
    message = (b"\x0a" + bytes([len(encoded)]) + encoded) if encoded else b""
    body = b"\x00" + len(message).to_bytes(4, "big") + message
    headers = (
        b"\x83"  # :method POST (static table 3)
        b"\x86"  # :scheme http (static table 6)
        + _hpack_literal(b":path", b"/grpc.health.v1.Health/Check")
        + _hpack_literal(b":authority", authority.encode())
        + _hpack_literal(b"content-type", b"application/grpc")
        + _hpack_literal(b"te", b"trailers")
    )
    return (
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
        + _h2_frame(0x4, 0x0, 0, b"")  # SETTINGS, none changed
        + _h2_frame(0x1, 0x4, 1, headers)  # HEADERS, END_HEADERS
        + _h2_frame(0x0, 0x1, 1, body)  # DATA, END_STREAM
    )


SERVING_REPLY = bytes.fromhex("00000000020801")
"""A gRPC message of 2 bytes holding ``HealthCheckResponse{status: SERVING}`` (field 1 = 1);
NOT_SERVING ends in ``0802``, an unknown service is a NOT_FOUND status with no message."""


@dataclass(frozen=True)
class Backend:
    name: str
    address: str
    """``host:port``."""


def haproxy_config(
    bind: str,
    servers: list[Backend],
    stats_bind: str,
    health_service: str,
    check_interval_ms: int = 250,
    retries: int = 3,
) -> str:
    """An HAProxy configuration: gRPC (HTTP/2, ``mode http``, ``proto h2`` on both sides)
    from ``bind`` to ``servers`` round-robin per request, each checked with a real gRPC health
    call for ``health_service``; Prometheus metrics (``/metrics``) and the CSV stats
    (``/stats;csv``) on ``stats_bind``.

    A request that reached no server (connection refused) or whose server closed the
    connection before any answer (killed mid-call) is sent again to another server, up to
    ``retries`` times. Search and Recommend are reads, and Track is idempotent by event id (a
    replayed event is a DUPLICATE), so replaying any of them is safe."""
    probe = grpc_health_probe(health_service).hex()
    lines = [
        "# Written by sluice.launch (sluice.balancer.haproxy_config); regenerated at each start.",
        "global",
        "    nbthread 1",
        "    log stdout format raw local0 info",
        "",
        "defaults",
        "    mode http",
        "    log global",
        "    option http-buffer-request",  # the whole request is held: a retry can replay it
        "    timeout connect 1s",
        "    timeout client 1h",  # idle storefront connections stay open
        "    timeout server 60s",  # longer than any call's deadline
        "    timeout http-request 10s",
        "    timeout check 2s",
        f"    retries {retries}",
        "    option redispatch 1",  # every retry goes to another server
        "    retry-on conn-failure empty-response",
        "",
        "frontend storefront",
        f"    bind {bind} proto h2",
        "    option httplog",  # one line per call: which gateway, retries, timings
        "    default_backend gateways",
        "",
        "backend gateways",
        "    balance roundrobin",
        "    option tcp-check",
        "    tcp-check connect",
        f"    tcp-check send-binary {probe}",
        f"    tcp-check expect binary {SERVING_REPLY.hex()}",
        f"    default-server proto h2 check inter {check_interval_ms}ms fall 2 rise 1",
    ]
    lines += [f"    server {s.name} {s.address}" for s in servers]
    lines += [
        "",
        "frontend stats",
        f"    bind {stats_bind}",
        "    no log",
        "    http-request use-service prometheus-exporter if { path /metrics }",
        "    stats enable",
        "    stats uri /stats",
        "",
    ]
    return "\n".join(lines)
