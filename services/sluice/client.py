"""A small storefront client: send Search / Recommend, and print a readable table (``render``,
which needs the ``tools`` extra)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from sluice.common.v1 import common_pb2
from sluice.v1 import storefront_pb2, storefront_pb2_grpc

if TYPE_CHECKING:
    from rich.console import Console

SOURCE_NAMES = {1: "ann", 2: "lexical", 3: "cooc", 4: "popular"}


def retry_delay_s(err: grpc.RpcError) -> float | None:
    """The delay a RESOURCE_EXHAUSTED answer asks for (its RetryInfo); None for any other."""
    if not isinstance(err, grpc.Call) or err.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
        return None
    status = rpc_status.from_call(err)
    info = error_details_pb2.RetryInfo()
    for detail in status.details if status else ():
        if detail.Unpack(info):
            return float(info.retry_delay.ToMilliseconds()) / 1000
    return None


class StorefrontClient:
    """The storefront API with the manners a client owes it: a refused request (the gateway
    at its concurrency limit) is retried after the delay its RetryInfo names, at most
    ``attempts`` times in all, within the call's own deadline."""

    def __init__(self, address: str, attempts: int = 3) -> None:
        self.channel = grpc.insecure_channel(address)
        self.stub = storefront_pb2_grpc.StorefrontServiceStub(self.channel)
        self.attempts = attempts

    def _call(self, method: Any, request: Any, timeout_s: float) -> Any:
        deadline = time.monotonic() + timeout_s
        for attempt in range(self.attempts):
            try:
                return method(request, timeout=max(0.001, deadline - time.monotonic()))
            except grpc.RpcError as err:
                delay = retry_delay_s(err)
                last = attempt == self.attempts - 1
                if delay is None or last or time.monotonic() + delay >= deadline:
                    raise
                time.sleep(delay)  # the server asked for this back-off
        raise AssertionError("unreachable")

    def close(self) -> None:
        self.channel.close()

    def search(
        self,
        query: str,
        user_id: str = "",
        page_size: int = 10,
        filters: list[common_pb2.AttributeFilter] | None = None,
        page_token: str = "",
        timeout_s: float = 1.0,
    ) -> storefront_pb2.SearchResponse:
        req = storefront_pb2.SearchRequest(
            query=query,
            user_id=user_id,
            page_size=page_size,
            filters=filters or [],
            page_token=page_token,
        )
        resp: storefront_pb2.SearchResponse = self._call(self.stub.Search, req, timeout_s)
        return resp

    def recommend(
        self,
        user_id: str,
        page_size: int = 10,
        context_item_id: int = 0,
        filters: list[common_pb2.AttributeFilter] | None = None,
        page_token: str = "",
        timeout_s: float = 1.0,
    ) -> storefront_pb2.RecommendResponse:
        surface = (
            storefront_pb2.SURFACE_SIMILAR_ITEMS if context_item_id else storefront_pb2.SURFACE_HOME
        )
        req = storefront_pb2.RecommendRequest(
            user_id=user_id,
            surface=surface,
            context_item_id=context_item_id,
            page_size=page_size,
            filters=filters or [],
            page_token=page_token,
        )
        resp: storefront_pb2.RecommendResponse = self._call(self.stub.Recommend, req, timeout_s)
        return resp


def render(
    title: str,
    resp: storefront_pb2.SearchResponse | storefront_pb2.RecommendResponse,
    console: Console,
) -> None:
    """Print a page as a table (``rich``, from the ``tools`` extra)."""
    from rich.table import Table

    page = resp.page
    table = Table(title=title, title_justify="left", show_lines=False)
    for col, kw in (
        ("#", {"justify": "right"}),
        ("item", {"justify": "right"}),
        ("title", {}),
        ("source", {}),
        ("recall", {"justify": "right"}),
        ("coarse", {"justify": "right"}),
        ("fine", {"justify": "right"}),
    ):
        table.add_column(col, **kw)  # type: ignore[arg-type]

    def fmt(values: object, i: int) -> str:
        seq = list(values)  # type: ignore[call-overload]
        return f"{seq[i]:.3f}" if i < len(seq) and seq[i] == seq[i] else "-"

    for i, item in enumerate(page.item_ids):
        table.add_row(
            str(i + 1),
            str(item),
            page.titles[i][:70],
            SOURCE_NAMES.get(page.sources[i], "?"),
            fmt(page.recall_scores, i),
            fmt(page.coarse_scores, i),
            fmt(page.fine_scores, i),
        )
    console.print(table)
    stages = "  ".join(
        f"{common_pb2.Stage.Name(s.stage).removeprefix('STAGE_').lower()}: "
        f"{s.candidates_in}→{s.candidates_out} "
        f"{s.duration_us / 1000:.1f} ms{' (degraded)' if s.degraded else ''}"
        for s in resp.stages
    )
    console.print(f"[dim]{stages}  total {resp.duration_us / 1000:.1f} ms[/]")
