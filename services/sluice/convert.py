"""Conversions between protobuf messages and domain objects (servicers only)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np

from sluice.common.v1 import common_pb2
from sluice.core.errors import InvalidArgument
from sluice.data.catalog import STRING_ATTRIBUTES, WORD_ATTRIBUTES
from sluice.data.filters import (
    MAX_FILTER_VALUES,
    MAX_FILTERS,
    MAX_VALUE_CHARS,
    AttributeFilter,
    validate,
)
from sluice.domain import (
    MAX_BOOSTS,
    MAX_FUSION_BETA,
    MAX_PER_BRAND,
    MAX_PIN_POSITION,
    MAX_PINS,
    MODEL_SPEC,
    Boost,
    Candidates,
    FineOverrides,
    Pin,
    RankContext,
    RequestKind,
    RerankOverrides,
    ShardReport,
    Source,
    StageName,
    StageReport,
    Surface,
)
from sluice.embed.text import TEXT_DIM

# the ItemFilter cases that hold a set of strings: an attribute's values, or its exclusions
_STRING_CASES = STRING_ATTRIBUTES + WORD_ATTRIBUTES + tuple(f"not_{a}" for a in STRING_ATTRIBUTES)

# The limits sluice.common.v1.RankContext states; every stage enforces them.
MAX_QUERY_CHARS = 2048
MAX_HISTORY = 1000
MAX_EXCLUSIONS = 10_000
MAX_BUILD_ID_CHARS = 128


_MAX_SOURCE = max(int(s) for s in Source)


def candidates_from_proto(msg: common_pb2.Candidates, field: str = "candidates") -> Candidates:
    """Candidates in either encoding (the repeated fields, or the packed arrays), validated."""
    if msg.item_ids_le or msg.scores_le or msg.sources_u8:
        if len(msg.item_ids) or len(msg.scores) or len(msg.sources):
            raise InvalidArgument(
                "set the repeated fields or the packed arrays, not both",
                field_path=f"{field}.item_ids_le",
            )
        return _packed_candidates(msg, field)
    n = len(msg.item_ids)
    if len(msg.scores) not in (0, n):
        raise InvalidArgument(
            f"{len(msg.scores)} scores for {n} item_ids", field_path=f"{field}.scores"
        )
    if len(msg.sources) not in (0, n):
        raise InvalidArgument(
            f"{len(msg.sources)} sources for {n} item_ids", field_path=f"{field}.sources"
        )
    sources = np.zeros(n, np.int8)
    if len(msg.sources):  # checked as integers: an unknown enum value may be any int32
        wide = np.fromiter(msg.sources, dtype=np.int64, count=len(msg.sources))
        if wide.min() < 0 or wide.max() > _MAX_SOURCE:
            raise InvalidArgument("unknown candidate source", field_path=f"{field}.sources")
        sources = wide.astype(np.int8)
    scores = np.zeros(n, np.float32)
    if n and len(msg.scores):
        scores = np.fromiter(msg.scores, dtype=np.float32, count=n)
        if not np.isfinite(scores).all():
            raise InvalidArgument("scores must be finite", field_path=f"{field}.scores")
    return Candidates(np.fromiter(msg.item_ids, dtype=np.int64, count=n), scores, sources)


def _packed_candidates(msg: common_pb2.Candidates, field: str) -> Candidates:
    """The packed arrays, read in place and copied once (the copies are the stage's own)."""
    if len(msg.item_ids_le) % 8:
        raise InvalidArgument(
            f"{len(msg.item_ids_le)} bytes is not a whole number of int64 item ids",
            field_path=f"{field}.item_ids_le",
        )
    n = len(msg.item_ids_le) // 8
    if len(msg.scores_le) not in (0, 4 * n):
        raise InvalidArgument(
            f"{len(msg.scores_le)} bytes of float32 scores for {n} item ids",
            field_path=f"{field}.scores_le",
        )
    if len(msg.sources_u8) not in (0, n):
        raise InvalidArgument(
            f"{len(msg.sources_u8)} sources for {n} item ids", field_path=f"{field}.sources_u8"
        )
    ids = np.frombuffer(msg.item_ids_le, dtype="<i8").astype(np.int64)
    scores = np.zeros(n, np.float32)
    if msg.scores_le:
        scores = np.frombuffer(msg.scores_le, dtype="<f4").astype(np.float32)
        if not np.isfinite(scores).all():
            raise InvalidArgument("scores must be finite", field_path=f"{field}.scores_le")
    sources = np.zeros(n, np.int8)
    if msg.sources_u8:
        raw = np.frombuffer(msg.sources_u8, dtype=np.uint8)
        if raw.max() > _MAX_SOURCE:
            raise InvalidArgument("unknown candidate source", field_path=f"{field}.sources_u8")
        sources = raw.astype(np.int8)
    return Candidates(ids, scores, sources)


def candidates_to_proto(c: Candidates, packed: bool = False) -> common_pb2.Candidates:
    """``packed``: the arrays as bytes (CANDIDATE_ENCODING_PACKED), else the repeated fields."""
    if packed:
        return common_pb2.Candidates(
            item_ids_le=c.item_ids.astype("<i8", copy=False).tobytes(),
            scores_le=c.scores.astype("<f4", copy=False).tobytes(),
            sources_u8=c.sources.astype(np.uint8).tobytes(),
        )
    return common_pb2.Candidates(
        item_ids=c.item_ids.tolist(), scores=c.scores.tolist(), sources=c.sources.tolist()
    )


def filters_from_proto(
    filters: Sequence[common_pb2.AttributeFilter], prefix: str = "filters"
) -> tuple[AttributeFilter, ...]:
    """The storefront API's first filter form (``AttributeFilter``), validated."""
    if len(filters) > MAX_FILTERS:  # before building any of them: 10,000 cost milliseconds
        raise InvalidArgument(f"at most {MAX_FILTERS} filters", field_path=prefix)
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


def item_filters_from_proto(
    filters: Sequence[common_pb2.ItemFilter], prefix: str = "item_filters"
) -> tuple[AttributeFilter, ...]:
    """Typed filters (``ItemFilter``, one condition per filter), validated."""
    if len(filters) > MAX_FILTERS:
        raise InvalidArgument(f"at most {MAX_FILTERS} filters", field_path=prefix)
    out = []
    for i, f in enumerate(filters):
        where = f"{prefix}[{i}]"
        case = f.WhichOneof("condition")
        if case is None:
            raise InvalidArgument(
                "set one condition: category, brand, color, title_words, price_cents, "
                "in_stock, not_category, not_brand or not_color",
                field_path=where,
            )
        if case in _STRING_CASES:
            values = tuple(getattr(f, case).values)
            if not values or len(values) > MAX_FILTER_VALUES:
                raise InvalidArgument(
                    f"needs 1 to {MAX_FILTER_VALUES} values", field_path=f"{where}.{case}.values"
                )
            if case.startswith("not_"):
                out.append(AttributeFilter(case.removeprefix("not_"), none_of=values))
            else:
                out.append(AttributeFilter(case, any_of=values))
        elif case == "price_cents":
            r = f.price_cents
            low = float(r.min) if r.HasField("min") else None
            high = float(r.max) if r.HasField("max") else None
            if low is None and high is None:
                raise InvalidArgument("set min and/or max", field_path=f"{where}.price_cents")
            if low is not None and high is not None and low > high:
                raise InvalidArgument("min is above max", field_path=f"{where}.price_cents.min")
            out.append(AttributeFilter(case, min=low, max=high))
        else:
            out.append(AttributeFilter(case, equals=f.in_stock))
    validate(out, prefix)
    return tuple(out)


_INT64 = (-(2**63), 2**63 - 1)


def item_filters_to_proto(filters: Iterable[AttributeFilter]) -> list[common_pb2.ItemFilter]:
    """Validated filters in the typed form the stages read.

    Price bounds become integers without changing what passes: prices are whole cents, so
    an inclusive lower bound rounds up and an upper bound rounds down."""
    out = []
    for f in filters:
        if f.field in STRING_ATTRIBUTES + WORD_ATTRIBUTES:
            msg = common_pb2.ItemFilter()
            if f.none_of:
                getattr(msg, f"not_{f.field}").values.extend(f.none_of)
            else:
                getattr(msg, f.field).values.extend(f.any_of)
        elif f.field == "price_cents":
            rng = common_pb2.Int64Range()
            if f.min is not None:
                rng.min = int(min(max(math.ceil(f.min), _INT64[0]), _INT64[1]))
            if f.max is not None:
                rng.max = int(min(max(math.floor(f.max), _INT64[0]), _INT64[1]))
            msg = common_pb2.ItemFilter(price_cents=rng)
        else:
            msg = common_pb2.ItemFilter(in_stock=bool(f.equals))
        out.append(msg)
    return out


def query_embedding_from_proto(
    values: Sequence[float], field: str = "query_embedding"
) -> np.ndarray | None:
    if len(values) == 0:
        return None
    if len(values) != TEXT_DIM:
        raise InvalidArgument(f"expected {TEXT_DIM} values, got {len(values)}", field_path=field)
    vec = np.asarray(values, dtype=np.float32)
    if not np.isfinite(vec).all():
        raise InvalidArgument("values must be finite", field_path=field)
    return vec


def _ids(values: Sequence[int], field: str, limit: int) -> np.ndarray:
    if len(values) > limit:
        raise InvalidArgument(f"at most {limit} ids", field_path=field)
    return np.asarray(values, dtype=np.int64)


def context_from_proto(msg: common_pb2.RankContext, field: str = "context") -> RankContext:
    """A stage request's context, checked against the limits the proto states."""
    if len(msg.query) > MAX_QUERY_CHARS:
        raise InvalidArgument(f"at most {MAX_QUERY_CHARS} characters", field_path=f"{field}.query")
    try:
        kind, surface = RequestKind(msg.kind), Surface(msg.surface)
    except ValueError as err:
        raise InvalidArgument(f"unknown enum value: {err}", field_path=f"{field}.kind") from err
    return RankContext(
        kind=kind,
        surface=surface,
        query=msg.query,
        query_embedding=query_embedding_from_proto(msg.query_embedding, f"{field}.query_embedding"),
        history_item_ids=_ids(msg.history_item_ids, f"{field}.history_item_ids", MAX_HISTORY),
        context_item_id=int(msg.context_item_id),
        filters=item_filters_from_proto(msg.filters, f"{field}.filters"),
        exclude_item_ids=_ids(msg.exclude_item_ids, f"{field}.exclude_item_ids", MAX_EXCLUSIONS),
        build_id=_build_id(msg.build_id, f"{field}.build_id"),
        pins=pins_from_proto(msg.pins, f"{field}.pins"),
        boosts=boosts_from_proto(msg.boosts, f"{field}.boosts"),
        rerank=overrides_from_proto(msg.rerank, f"{field}.rerank"),
        fine=fine_overrides_from_proto(msg.fine, f"{field}.fine"),
    )


def overrides_from_proto(msg: common_pb2.RerankOverrides, field: str) -> RerankOverrides:
    values: dict[str, float | int] = {}
    for name in ("diversity_lambda", "exposure_tail_share"):
        if msg.HasField(name):
            value = float(getattr(msg, name))
            if not (math.isfinite(value) and 0.0 <= value <= 1.0):
                raise InvalidArgument("a finite number from 0 to 1", field_path=f"{field}.{name}")
            values[name] = value
    if msg.HasField("max_per_brand"):
        if not 0 <= msg.max_per_brand <= MAX_PER_BRAND:
            raise InvalidArgument(f"0 to {MAX_PER_BRAND}", field_path=f"{field}.max_per_brand")
        values["max_per_brand"] = int(msg.max_per_brand)
    return RerankOverrides(**values)  # type: ignore[arg-type]


def overrides_to_proto(o: RerankOverrides) -> common_pb2.RerankOverrides:
    return common_pb2.RerankOverrides(
        diversity_lambda=o.diversity_lambda,
        max_per_brand=o.max_per_brand,
        exposure_tail_share=o.exposure_tail_share,
    )


def fine_overrides_from_proto(msg: common_pb2.FineOverrides, field: str) -> FineOverrides:
    model = msg.model or None
    if model is not None and not MODEL_SPEC.fullmatch(model):
        raise InvalidArgument(
            'a Triton model "name" or "name:version" (letters, digits, "_", "-", "."; at most '
            "128 characters)",
            field_path=f"{field}.model",
        )
    if not msg.HasField("fusion_beta"):
        return FineOverrides(model=model)
    beta = float(msg.fusion_beta)
    if not (math.isfinite(beta) and 0.0 <= beta <= MAX_FUSION_BETA):
        raise InvalidArgument(
            f"a finite number from 0 to {MAX_FUSION_BETA:g}", field_path=f"{field}.fusion_beta"
        )
    return FineOverrides(beta, model)


def pins_from_proto(pins: Sequence[common_pb2.ItemPin], field: str) -> tuple[Pin, ...]:
    if len(pins) > MAX_PINS:
        raise InvalidArgument(f"at most {MAX_PINS} pins", field_path=field)
    out = []
    for i, p in enumerate(pins):
        if not 1 <= p.position <= MAX_PIN_POSITION:
            raise InvalidArgument(
                f"position must be 1 to {MAX_PIN_POSITION}", field_path=f"{field}[{i}].position"
            )
        out.append(Pin(int(p.item_id), int(p.position)))
    return tuple(out)


def boosts_from_proto(boosts: Sequence[common_pb2.ItemBoost], field: str) -> tuple[Boost, ...]:
    if len(boosts) > MAX_BOOSTS:
        raise InvalidArgument(f"at most {MAX_BOOSTS} boosts", field_path=field)
    out = []
    for i, b in enumerate(boosts):
        where = f"{field}[{i}]"
        if not (math.isfinite(b.weight) and -1.0 <= b.weight <= 1.0):
            raise InvalidArgument(
                "weight must be a finite number from -1 to 1", field_path=f"{where}.weight"
            )
        case = b.WhichOneof("target")
        if case is None:
            raise InvalidArgument("set one target: item_id, brand or category", field_path=where)
        if case in ("brand", "category"):
            value = getattr(b, case)
            if not 1 <= len(value) <= MAX_VALUE_CHARS:
                raise InvalidArgument(
                    f"1 to {MAX_VALUE_CHARS} characters", field_path=f"{where}.{case}"
                )
            out.append(Boost(float(b.weight), **{case: value}))
        else:
            out.append(Boost(float(b.weight), item_id=int(b.item_id)))
    return tuple(out)


def pins_to_proto(pins: Iterable[Pin]) -> list[common_pb2.ItemPin]:
    return [common_pb2.ItemPin(item_id=p.item_id, position=p.position) for p in pins]


def boosts_to_proto(boosts: Iterable[Boost]) -> list[common_pb2.ItemBoost]:
    out = []
    for b in boosts:
        if b.brand:
            out.append(common_pb2.ItemBoost(brand=b.brand, weight=b.weight))
        elif b.category:
            out.append(common_pb2.ItemBoost(category=b.category, weight=b.weight))
        else:
            out.append(common_pb2.ItemBoost(item_id=b.item_id, weight=b.weight))
    return out


def _build_id(value: str, field: str) -> str:
    if len(value) > MAX_BUILD_ID_CHARS or not value.isprintable():
        raise InvalidArgument(
            f"at most {MAX_BUILD_ID_CHARS} printable characters", field_path=field
        )
    return value


def context_to_proto(ctx: RankContext) -> common_pb2.RankContext:
    emb = ctx.query_embedding
    return common_pb2.RankContext(
        kind=common_pb2.RequestKind.Name(int(ctx.kind)),
        surface=common_pb2.Surface.Name(int(ctx.surface)),
        query=ctx.query,
        query_embedding=emb.tolist() if emb is not None else (),
        history_item_ids=ctx.history_item_ids.tolist(),
        context_item_id=ctx.context_item_id,
        exclude_item_ids=ctx.exclude_item_ids.tolist(),
        filters=item_filters_to_proto(ctx.filters),
        build_id=ctx.build_id,
        pins=pins_to_proto(ctx.pins),
        boosts=boosts_to_proto(ctx.boosts),
        rerank=overrides_to_proto(ctx.rerank),
        fine=common_pb2.FineOverrides(fusion_beta=ctx.fine.fusion_beta, model=ctx.fine.model or ""),
    )


def report_to_proto(r: StageReport) -> common_pb2.StageReport:
    return common_pb2.StageReport(
        stage=common_pb2.Stage.Name(int(r.stage)),
        candidates_in=r.candidates_in,
        candidates_out=r.candidates_out,
        duration_us=r.duration_us,
        degraded=r.degraded,
        degraded_reason=r.degraded_reason,
        build_id=r.build_id,
        shards=[
            common_pb2.ShardReport(
                shard_index=s.index,
                answered=s.answered,
                error=s.error,
                duration_us=s.duration_us,
                candidates_out=s.candidates_out,
            )
            for s in r.shards
        ],
    )


def report_from_proto(m: common_pb2.StageReport) -> StageReport:
    return StageReport(
        stage=StageName(m.stage),
        candidates_in=m.candidates_in,
        candidates_out=m.candidates_out,
        duration_us=m.duration_us,
        degraded=m.degraded,
        degraded_reason=m.degraded_reason,
        build_id=m.build_id,
        shards=[
            ShardReport(s.shard_index, s.answered, s.error, s.duration_us, s.candidates_out)
            for s in m.shards
        ],
    )


def check_range(value: int, field: str, low: int, high: int) -> int:
    if value < low or value > high:
        raise InvalidArgument(f"must be between {low} and {high}, got {value}", field_path=field)
    return value
