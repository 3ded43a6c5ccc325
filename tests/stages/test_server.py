"""The shared bootstrap: health gating, error mapping, request ids, metrics, drain."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from sluice.builds import LoadedBuilds
from sluice.common.v1 import common_pb2
from sluice.core.server import RPC_TOTAL, RunningService, ServerOptions, ServiceSpec, bind
from sluice.core.stage import StageLimits, StageServicer
from sluice.data.catalog import Catalog
from sluice.rerank.engine import RerankEngine
from sluice.rerank.service import BINDING
from sluice.rerank.v2 import rerank_pb2, rerank_pb2_grpc

SERVICE = "sluice.rerank.v2.RerankService"


@pytest.fixture
def service() -> Iterator[tuple[RunningService, threading.Event, StageServicer]]:
    """A real rerank service on a free port whose warm-up waits for the test."""
    release = threading.Event()
    servicer = StageServicer(
        BINDING, StageLimits(max_candidates=100, default_deadline_s=1.0), LoadedBuilds()
    )
    catalog = Catalog.from_columns([1, 2, 3], ["a", "b", "c"])

    def warmup() -> None:
        assert release.wait(30)
        servicer.builds.add("test", RerankEngine(catalog, np.eye(3, dtype=np.float32)))

    svc = bind(ServiceSpec("rerank", servicer.add_to, warmup), ServerOptions())
    yield svc, release, servicer
    release.set()
    svc.stop(0.5)


def health_status(port: int) -> int:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        return int(stub.Check(health_pb2.HealthCheckRequest(), timeout=5).status)


def rerank(
    port: int, req: rerank_pb2.RankCandidatesRequest, rid: str = "", timeout: float | None = 5
) -> rerank_pb2.RankCandidatesResponse:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        stub = rerank_pb2_grpc.RerankServiceStub(ch)
        meta = (("x-request-id", rid),) if rid else ()
        resp, call = stub.RankCandidates.with_call(req, timeout=timeout, metadata=meta)
        rerank.last_metadata = dict(call.trailing_metadata())  # type: ignore[attr-defined]
        return resp  # type: ignore[no-any-return]


GOOD = rerank_pb2.RankCandidatesRequest(
    candidates=common_pb2.Candidates(item_ids=[1, 2, 3], scores=[3, 2, 1], sources=[1, 1, 1]),
    max_candidates=2,
)


def test_not_serving_and_unavailable_until_warm(service: tuple) -> None:
    svc, release, _ = service
    assert health_status(svc.port) == health_pb2.HealthCheckResponse.NOT_SERVING
    with pytest.raises(grpc.RpcError) as err:
        rerank(svc.port, GOOD)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    warmer = threading.Thread(target=svc.warm)
    warmer.start()
    release.set()
    warmer.join(30)
    assert health_status(svc.port) == health_pb2.HealthCheckResponse.SERVING
    assert list(rerank(svc.port, GOOD).candidates.item_ids) == [1, 2]


def test_domain_errors_become_statuses_with_details(service: tuple) -> None:
    svc, release, _ = service
    release.set()
    svc.warm()
    bad = rerank_pb2.RankCandidatesRequest(candidates=GOOD.candidates, max_candidates=0)
    before = RPC_TOTAL.labels(SERVICE, "RankCandidates", "INVALID_ARGUMENT")._value.get()
    with pytest.raises(grpc.RpcError) as err:
        rerank(svc.port, bad)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert len(dict(err.value.trailing_metadata())["x-request-id"]) == 16  # errors carry it too
    status = rpc_status.from_call(err.value)
    kinds = {d.type_url.rsplit("/", 1)[-1] for d in status.details}
    assert kinds == {"google.rpc.ErrorInfo", "google.rpc.BadRequest"}
    br = error_details_pb2.BadRequest()
    next(d for d in status.details if d.Is(br.DESCRIPTOR)).Unpack(br)
    assert [v.field for v in br.field_violations] == ["max_candidates"]
    after = RPC_TOTAL.labels(SERVICE, "RankCandidates", "INVALID_ARGUMENT")._value.get()
    assert after == before + 1
    # mismatched packed arrays are the caller's fault too, never INTERNAL
    ragged = rerank_pb2.RankCandidatesRequest(
        candidates=common_pb2.Candidates(item_ids=[1, 2], scores=[1.0]), max_candidates=1
    )
    with pytest.raises(grpc.RpcError) as err:
        rerank(svc.port, ragged)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_request_id_is_echoed_or_minted(service: tuple) -> None:
    svc, release, _ = service
    release.set()
    svc.warm()
    rerank(svc.port, GOOD, rid="abc123")
    assert rerank.last_metadata["x-request-id"] == "abc123"  # type: ignore[attr-defined]
    rerank(svc.port, GOOD)
    assert len(rerank.last_metadata["x-request-id"]) == 16  # type: ignore[attr-defined]


def test_stop_drains_and_reports_not_serving(service: tuple) -> None:
    svc, release, _ = service
    release.set()
    svc.warm()
    svc.stop(0.5)
    with pytest.raises(grpc.RpcError) as err:
        rerank(svc.port, GOOD)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_free_ports_are_distinct_bindable_and_below_the_ephemeral_range() -> None:
    from pathlib import Path

    from sluice.launch import free_ports

    ports = free_ports(40)
    assert len(set(ports)) == 40
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    assert all(p < low for p in ports)
    for p in ports[:5]:
        with socket.socket() as s:
            s.bind(("127.0.0.1", p))


def _violations(err: grpc.RpcError) -> list[str]:
    status = rpc_status.from_call(err)
    br = error_details_pb2.BadRequest()
    next(d for d in status.details if d.Is(br.DESCRIPTOR)).Unpack(br)
    return [v.field for v in br.field_violations]


def test_a_call_without_deadline_gets_the_default_budget(service: tuple) -> None:
    """grpcio reports a huge time_remaining() without a deadline; it must not overflow into
    an instant DEADLINE_EXCEEDED (every foreign client that sets none hit that)."""
    svc, release, _ = service
    release.set()
    svc.warm()
    resp = rerank(svc.port, GOOD, timeout=None)
    assert list(resp.candidates.item_ids) == [1, 2]


def test_the_page_window_and_total(service: tuple) -> None:
    svc, release, _ = service
    release.set()
    svc.warm()
    req = rerank_pb2.RankCandidatesRequest()
    req.CopyFrom(GOOD)
    req.offset = 2
    resp = rerank(svc.port, req)
    assert list(resp.candidates.item_ids) == [3] and resp.total_size == 3
    assert resp.report.candidates_in == 3 and resp.report.candidates_out == 1


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (
            lambda r: r.context.query_embedding.extend([float("nan")] * 384),
            "context.query_embedding",
        ),
        (lambda r: r.context.query_embedding.extend([0.1] * 3), "context.query_embedding"),
        (lambda r: r.context.filters.add(), "context.filters[0]"),
        (lambda r: r.context.filters.add().brand.SetInParent(), "context.filters[0].brand.values"),
        (lambda r: setattr(r.context, "query", "q" * 3000), "context.query"),
        (lambda r: setattr(r.context, "build_id", "b" * 129), "context.build_id"),
        (lambda r: setattr(r.context, "build_id", "a\x00b"), "context.build_id"),
        (lambda r: r.context.history_item_ids.extend(range(1001)), "context.history_item_ids"),
        (lambda r: setattr(r, "max_candidates", 101), "max_candidates"),
        (lambda r: setattr(r, "offset", -1), "offset"),
        (lambda r: r.candidates.item_ids.extend(range(200)), "candidates.item_ids"),
        (lambda r: r.candidates.scores.__setitem__(0, float("inf")), "candidates.scores"),
        (lambda r: r.candidates.sources.__setitem__(1, 99), "candidates.sources"),
    ],
)
def test_bad_stage_input_names_the_field(service: tuple, mutate: Any, field: str) -> None:
    svc, release, _ = service
    release.set()
    svc.warm()
    req = rerank_pb2.RankCandidatesRequest()
    req.CopyFrom(GOOD)
    mutate(req)
    with pytest.raises(grpc.RpcError) as err:
        rerank(svc.port, req)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert _violations(err.value) == [field]


def packed(req: rerank_pb2.RankCandidatesRequest) -> rerank_pb2.RankCandidatesRequest:
    """``req`` with its candidates as packed arrays, asking for a packed answer."""
    out = rerank_pb2.RankCandidatesRequest()
    out.CopyFrom(req)
    out.candidates.Clear()
    out.candidates.item_ids_le = np.array(req.candidates.item_ids, "<i8").tobytes()
    out.candidates.scores_le = np.array(req.candidates.scores, "<f4").tobytes()
    out.candidates.sources_u8 = np.array(req.candidates.sources, np.uint8).tobytes()
    out.response_encoding = common_pb2.CANDIDATE_ENCODING_PACKED
    return out


def test_packed_candidates_are_answered_packed_with_the_same_page(service: tuple) -> None:
    svc, release, _ = service
    release.set()
    svc.warm()
    plain = rerank(svc.port, GOOD)
    resp = rerank(svc.port, packed(GOOD))
    assert len(resp.candidates.item_ids) == 0 and len(resp.candidates.scores) == 0
    assert np.frombuffer(resp.candidates.item_ids_le, "<i8").tolist() == list(
        plain.candidates.item_ids
    )
    np.testing.assert_array_equal(
        np.frombuffer(resp.candidates.scores_le, "<f4"), np.array(plain.candidates.scores)
    )
    assert np.frombuffer(resp.candidates.sources_u8, np.uint8).tolist() == list(
        plain.candidates.sources
    )


def _set(field: str, value: Any) -> Any:
    return lambda r: setattr(r.candidates, field, value)


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (_set("item_ids_le", b"\x01" * 7), "candidates.item_ids_le"),
        (_set("item_ids_le", b"\x01" * 8 * 101), "candidates.item_ids_le"),
        (_set("scores_le", b"\x00" * 5), "candidates.scores_le"),
        (_set("scores_le", np.array([1, np.nan, 2], "<f4").tobytes()), "candidates.scores_le"),
        (_set("sources_u8", bytes([1, 99, 1])), "candidates.sources_u8"),
        (_set("sources_u8", bytes([1])), "candidates.sources_u8"),
        (lambda r: r.candidates.item_ids.append(4), "candidates.item_ids_le"),  # both forms
        (lambda r: setattr(r, "response_encoding", 7), "response_encoding"),
    ],
)
def test_bad_packed_candidates_name_the_field(service: tuple, mutate: Any, field: str) -> None:
    svc, release, _ = service
    release.set()
    svc.warm()
    req = packed(GOOD)
    mutate(req)
    with pytest.raises(grpc.RpcError) as err:
        rerank(svc.port, req)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert _violations(err.value) == [field]


def test_a_request_is_answered_by_the_build_it_names_or_unavailable(service: tuple) -> None:
    """A caller pins a build (``context.build_id``): the stage answers from it and says so;
    a build it has not loaded is UNAVAILABLE (another replica may have it), not another."""
    svc, release, _ = service
    release.set()
    svc.warm()
    resp = rerank(svc.port, GOOD)  # no build named: the current one
    assert resp.report.build_id == "test"
    req = rerank_pb2.RankCandidatesRequest()
    req.CopyFrom(GOOD)
    req.context.build_id = "test"
    assert rerank(svc.port, req).report.build_id == "test"
    req.context.build_id = "20991231T000000Z-abcdef"
    with pytest.raises(grpc.RpcError) as err:
        rerank(svc.port, req)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "not loaded here" in (err.value.details() or "")


def _raw_call(port: int, body: bytes) -> grpc.RpcError:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        call = ch.unary_unary(BINDING.path)  # bytes in, bytes out: no client-side checks
        with pytest.raises(grpc.RpcError) as err:
            call(body, timeout=5)
        return err.value


@pytest.mark.parametrize(
    "body",
    [
        b"\xff\xff\xff\xff",  # not a protobuf message at all
        b"\x0a\x04\x1a\x02\xff\xfe",  # context.query holds invalid UTF-8
        b"\x12\x05\x0a\x03\x01",  # candidates truncated mid-field
    ],
)
def test_undecodable_bytes_are_invalid_argument_not_internal(service: tuple, body: bytes) -> None:
    svc, release, _ = service
    release.set()
    svc.warm()
    err = _raw_call(svc.port, body)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
    assert "not a valid sluice.rerank.v2.RankCandidatesRequest" in (err.details() or "")
    assert list(rerank(svc.port, GOOD).candidates.item_ids) == [1, 2]  # still serving


def test_an_oversized_request_is_refused_before_parsing(service: tuple) -> None:
    svc, release, _ = service
    release.set()
    svc.warm()
    err = _raw_call(svc.port, b"\x0a" + b"\x00" * (5 << 20))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_reflection_serves_v1_and_v1alpha_or_nothing() -> None:
    from grpc_reflection.v1alpha import reflection_pb2

    from sluice.config import RerankSettings

    assert RerankSettings().serves_reflection()
    assert not RerankSettings(profile="production").serves_reflection()
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    for enabled in (True, False):
        servicer = StageServicer(BINDING, StageLimits(10, 1.0), LoadedBuilds())
        svc = bind(ServiceSpec("rerank", servicer.add_to), ServerOptions(reflection=enabled))
        try:
            with grpc.insecure_channel(f"127.0.0.1:{svc.port}") as ch:
                for version in ("v1", "v1alpha"):
                    call = ch.stream_stream(
                        f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo",
                        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
                        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
                    )
                    if enabled:
                        (resp,) = list(call(iter([request]), timeout=5))
                        names = {s.name for s in resp.list_services_response.service}
                        assert SERVICE in names and "grpc.health.v1.Health" in names
                    else:
                        with pytest.raises(grpc.RpcError) as err:
                            list(call(iter([request]), timeout=5))
                        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
        finally:
            svc.stop(0.1)


@pytest.mark.parametrize("version", ["v1", "v1alpha"])
def test_reflection_answers_bytes_that_are_not_a_request_with_invalid_argument(
    version: str,
) -> None:
    """Reflection bypasses the interceptor; grpcio's own decoding answered a garbled frame
    with INTERNAL. A bad frame first, or after a good one in the same stream, ends the
    stream with INVALID_ARGUMENT and the interceptor's details, after the good answer."""
    from grpc_reflection.v1alpha import reflection_pb2

    good = reflection_pb2.ServerReflectionRequest(list_services="").SerializeToString()
    servicer = StageServicer(BINDING, StageLimits(10, 1.0), LoadedBuilds())
    svc = bind(ServiceSpec("rerank", servicer.add_to), ServerOptions())
    path = f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo"
    try:
        with grpc.insecure_channel(f"127.0.0.1:{svc.port}") as ch:
            for bad in (b"\xff\xff\xff", b"\x3a\x02\xc3\x28", b"\x0a" + b"\x80" * 12):
                for frames in ([bad], [good, bad]):
                    answers: list[bytes] = []
                    with pytest.raises(grpc.RpcError) as err:
                        answers.extend(ch.stream_stream(path)(iter(frames), timeout=5))
                    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                    status = rpc_status.from_call(err.value)
                    assert status is not None
                    kinds = {d.type_url.rsplit("/", 1)[1] for d in status.details}
                    assert kinds == {"google.rpc.ErrorInfo", "google.rpc.BadRequest"}
                    assert len(answers) == len(frames) - 1
            # the stream broke, not the service
            (resp,) = list(ch.stream_stream(path)(iter([good]), timeout=5))
            parsed = reflection_pb2.ServerReflectionResponse.FromString(resp)
            assert SERVICE in {s.name for s in parsed.list_services_response.service}
    finally:
        svc.stop(0.1)
