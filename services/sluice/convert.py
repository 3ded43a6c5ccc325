"""Conversions between protobuf messages and domain objects (servicers only)."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from sluice.common.v1 import common_pb2
from sluice.core.errors import InvalidArgument
from sluice.data.filters import AttributeFilter, validate
from sluice.domain import Candidates, RankContext, StageReport
from sluice.embed.text import TEXT_DIM


def candidates_from_proto(msg: common_pb2.Candidates, field: str = "candidates") -> Candidates:
    n = len(msg.item_ids)
    scores = (
        np.asarray(msg.scores, dtype=np.float32) if len(msg.scores) else np.zeros(n, np.float32)
    )
    sources = np.asarray(msg.sources, dtype=np.int8) if len(msg.sources) else np.zeros(n, np.int8)
    if len(scores) != n:
        raise InvalidArgument(
            f"{len(scores)} scores for {n} item_ids", field_path=f"{field}.scores"
        )
    if len(sources) != n:
        raise InvalidArgument(
            f"{len(sources)} sources for {n} item_ids", field_path=f"{field}.sources"
        )
    return Candidates(np.asarray(msg.item_ids, dtype=np.int64), scores, sources)


def candidates_to_proto(c: Candidates) -> common_pb2.Candidates:
    return common_pb2.Candidates(
        item_ids=c.item_ids.tolist(), scores=c.scores.tolist(), sources=c.sources.tolist()
    )


def filters_from_proto(
    filters: Iterable[common_pb2.AttributeFilter], prefix: str = "filters"
) -> tuple[AttributeFilter, ...]:
    out = tuple(
        AttributeFilter(
            field=f.field,
            any_of=tuple(f.any_of),
            min=f.min if f.HasField("min") else None,
            max=f.max if f.HasField("max") else None,
            equals=f.equals if f.HasField("equals") else None,
        )
        for f in filters
    )
    validate(out, prefix)
    return out


def filters_to_proto(filters: Iterable[AttributeFilter]) -> list[common_pb2.AttributeFilter]:
    out = []
    for f in filters:
        msg = common_pb2.AttributeFilter(field=f.field, any_of=list(f.any_of))
        if f.min is not None:
            msg.min = f.min
        if f.max is not None:
            msg.max = f.max
        if f.equals is not None:
            msg.equals = f.equals
        out.append(msg)
    return out


def query_embedding_from_proto(
    values: Iterable[float], field: str = "query_embedding"
) -> np.ndarray | None:
    vec = np.asarray(list(values), dtype=np.float32)
    if len(vec) == 0:
        return None
    if len(vec) != TEXT_DIM:
        raise InvalidArgument(f"expected {TEXT_DIM} values, got {len(vec)}", field_path=field)
    return vec


def context_from_stage_request(req: object) -> RankContext:
    """RankContext from any stage request (fields absent on a message are skipped)."""
    get = getattr
    return RankContext(
        query=get(req, "query", ""),
        query_embedding=query_embedding_from_proto(get(req, "query_embedding", ())),
        history_item_ids=np.asarray(list(get(req, "history_item_ids", ())), dtype=np.int64),
        context_item_id=int(get(req, "context_item_id", 0)),
        filters=filters_from_proto(get(req, "filters", ())),
        exclude_item_ids=np.asarray(list(get(req, "exclude_item_ids", ())), dtype=np.int64),
    )


def report_to_proto(r: StageReport) -> common_pb2.StageReport:
    return common_pb2.StageReport(
        stage=common_pb2.Stage.Name(int(r.stage)),
        candidates_in=r.candidates_in,
        candidates_out=r.candidates_out,
        duration_us=r.duration_us,
        degraded=r.degraded,
        degraded_reason=r.degraded_reason,
    )


def report_from_proto(m: common_pb2.StageReport) -> StageReport:
    from sluice.domain import StageName

    return StageReport(
        stage=StageName(m.stage),
        candidates_in=m.candidates_in,
        candidates_out=m.candidates_out,
        duration_us=m.duration_us,
        degraded=m.degraded,
        degraded_reason=m.degraded_reason,
    )


def check_budget(value: int, field: str, maximum: int) -> int:
    if value < 0 or value > maximum:
        raise InvalidArgument(f"must be between 0 and {maximum}, got {value}", field_path=field)
    return value
