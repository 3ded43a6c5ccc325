"""Blurbs (:mod:`sluice.gateway.blurbs`): extractive with the real MiniLM encoder, and the
adapter for an OpenAI-compatible text-generation server.

The adapter's tests run it against a small HTTP server in this process that speaks the same
``/v1/chat/completions`` protocol: they are protocol tests, not tests of any model.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np
import pytest

from sluice.data.catalog import Catalog
from sluice.embed.text import MiniLMEncoder
from sluice.gateway.blurbs import (
    GENERATED,
    MAX_CHARS,
    ExtractiveBlurbs,
    GeneratedBlurbs,
    grounded,
    item_sentences,
)

SHIRT = (
    "Soft combed cotton fabric with a relaxed fit. Machine washable at 40 degrees and "
    "tumble dry safe. Bright red colour that does not fade after many washes."
)
LAMP = "A desk lamp with three brightness levels\n• Flexible gooseneck arm\n• USB charging port"


def shop() -> Catalog:
    return Catalog.from_columns(
        [10, 11, 12, 13],
        ["Classic Tee", "Desk Lamp", "Plain Mug", "Acme Socks"],
        categories=["clothing", "lighting", "", "clothing"],
        brands=["Acme", "Lumo", "", "Acme"],
        descriptions=[SHIRT, LAMP, "", "Warm wool blend socks for cold winter days."],
    )


class Counting:
    """The real encoder, counting the sentences it is asked to encode."""

    def __init__(self, encoder: MiniLMEncoder) -> None:
        self.encoder = encoder
        self.texts = 0

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        self.texts += len(texts)
        return self.encoder.encode(list(texts))


def test_item_sentences_split_descriptions_and_add_attributes() -> None:
    catalog = shop()
    assert item_sentences(catalog, 0) == [
        "Soft combed cotton fabric with a relaxed fit.",
        "Machine washable at 40 degrees and tumble dry safe.",
        "Bright red colour that does not fade after many washes.",
        "Brand: Acme.",
        "Category: clothing.",
    ]
    assert item_sentences(catalog, 1)[:3] == [
        "A desk lamp with three brightness levels",
        "Flexible gooseneck arm",
        "USB charging port",
    ]
    assert item_sentences(catalog, 2) == []  # nothing known about the mug


@pytest.mark.parametrize(
    ("query", "first"),
    [
        ("washable shirt", "Machine washable at 40 degrees and tumble dry safe."),
        ("red t-shirt", "Bright red colour that does not fade after many washes."),
        ("cotton tee", "Soft combed cotton fabric with a relaxed fit."),
    ],
)
def test_the_blurb_leads_with_what_matches_the_query(
    encoder: MiniLMEncoder, query: str, first: str
) -> None:
    blurbs = ExtractiveBlurbs(shop(), None, encoder.encode)
    (blurb,) = blurbs.blurbs(np.array([0]), query, np.zeros(0, np.int64))
    assert blurb.startswith(first)
    assert len(blurb) <= MAX_CHARS
    sentences = set(item_sentences(shop(), 0))
    assert all(part in sentences for part in blurb.replace(". ", ".\n").split("\n"))


def test_a_recommendation_blurb_follows_the_recent_items(encoder: MiniLMEncoder) -> None:
    catalog = shop()
    vectors = encoder.encode(catalog.titles)
    blurbs = ExtractiveBlurbs(catalog, vectors, encoder.encode)
    # the shopper looked at Acme socks: the tee's blurb names the brand it shares
    after_socks = blurbs.blurbs(np.array([0]), "", np.array([3]))[0]
    assert "Brand: Acme." in after_socks
    after_lamp = blurbs.blurbs(np.array([0]), "", np.array([1]))[0]
    assert after_lamp != after_socks


def test_unknown_rows_and_bare_items_get_empty_blurbs_and_vectors_are_cached(
    encoder: MiniLMEncoder,
) -> None:
    counting = Counting(encoder)
    blurbs = ExtractiveBlurbs(shop(), None, counting)
    out = blurbs.blurbs(np.array([2, -1, 1, 7]), "lamp", np.zeros(0, np.int64))
    assert out[0] == "" and out[1] == "" and out[3] == "" and "lamp" in out[2].lower()
    first = counting.texts  # the lamp's sentences and the query
    assert first == len(item_sentences(shop(), 1)) + 1
    blurbs.blurbs(np.array([1, 2]), "gooseneck", np.zeros(0, np.int64))
    assert counting.texts == first + 1  # only the new query: the lamp's sentences are kept
    # the tee and the socks share "Category: clothing.": it is encoded once
    blurbs.blurbs(np.array([0, 3]), "lamp", np.zeros(0, np.int64))
    own = item_sentences(shop(), 0) + item_sentences(shop(), 3)
    assert counting.texts == first + 1 + len(set(own))


def test_one_request_encodes_a_bounded_number_of_new_sentences(encoder: MiniLMEncoder) -> None:
    counting = Counting(encoder)
    blurbs = ExtractiveBlurbs(shop(), None, counting, max_new_sentences=3)
    query = "bright red washable"
    # the tee has five sentences: over the budget, it is blurbed by the query's words alone
    first = blurbs.blurbs(np.array([0]), query, np.zeros(0, np.int64))[0]
    assert counting.texts == 1 + 3 and "red" in first.lower()  # the query, three sentences
    blurbs.blurbs(np.array([0]), query, np.zeros(0, np.int64))  # the next request goes on
    assert counting.texts == 1 + 5
    unbounded = ExtractiveBlurbs(shop(), None, encoder.encode)
    assert blurbs.blurbs(np.array([0]), query, np.zeros(0, np.int64)) == unbounded.blurbs(
        np.array([0]), query, np.zeros(0, np.int64)
    )


def test_grounded_accepts_only_the_items_own_words() -> None:
    sources = [SHIRT, "Classic Tee"]
    assert grounded("A machine washable cotton tee in bright red.", sources)
    assert grounded("Bright colour does not fade after washing.", sources)  # washing: wash
    assert not grounded("A waterproof cotton tee.", sources)  # waterproof is not in it
    assert not grounded("Rated 5 stars by 1000 shoppers.", sources)
    assert not grounded("", sources)


class _ChatServer:
    """A local HTTP server that answers ``/v1/chat/completions`` with ``reply``."""

    def __init__(self) -> None:
        self.reply: Any = "Machine washable cotton tee."
        self.status = 200
        self.requests: list[tuple[dict[str, Any], str]] = []
        self.gate: threading.Event | None = None
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                owner.requests.append((body, self.headers.get("Authorization", "")))
                if owner.gate is not None:
                    owner.gate.wait(5)
                if self.path != "/v1/chat/completions" or owner.status != 200:
                    self.send_response(owner.status if self.path.endswith("s") else 404)
                    self.end_headers()
                    return
                answer = {
                    "object": "chat.completion",
                    "choices": [
                        {"index": 0, "message": {"role": "assistant", "content": owner.reply}}
                    ],
                }
                data = json.dumps(answer).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def chat() -> Iterator[_ChatServer]:
    server = _ChatServer()
    yield server
    if server.gate is not None:
        server.gate.set()
    server.server.shutdown()


def _outcome(name: str) -> float:
    return GENERATED.labels(name)._value.get()


def test_generated_blurbs_use_a_grounded_answer(chat: _ChatServer, encoder: MiniLMEncoder) -> None:
    catalog = shop()
    fallback = ExtractiveBlurbs(catalog, None, encoder.encode)
    blurbs = GeneratedBlurbs(catalog, fallback, chat.url + "/", "small-model", api_key="k3y")
    before = _outcome("served")
    out = blurbs.blurbs(np.array([0]), "washable shirt", np.zeros(0, np.int64))
    assert out == ["Machine washable cotton tee."]
    assert _outcome("served") == before + 1
    ((body, auth),) = chat.requests
    assert body["model"] == "small-model" and auth == "Bearer k3y"
    prompt = body["messages"][0]["content"]
    assert "washable shirt" in prompt and "Bright red colour" in prompt and "Classic Tee" in prompt


@pytest.mark.parametrize(
    ("reply", "status", "outcome"),
    [
        ("Waterproof cotton tee, rated best of 2026.", 200, "refused"),  # not in the item
        ("", 200, "refused"),
        (None, 500, "failed"),
    ],
)
def test_generated_blurbs_fall_back_to_extractive(
    chat: _ChatServer, encoder: MiniLMEncoder, reply: str | None, status: int, outcome: str
) -> None:
    catalog = shop()
    fallback = ExtractiveBlurbs(catalog, None, encoder.encode)
    blurbs = GeneratedBlurbs(catalog, fallback, chat.url, "m")
    chat.reply, chat.status = reply, status
    before = _outcome(outcome)
    out = blurbs.blurbs(np.array([0, 2]), "red shirt", np.zeros(0, np.int64))
    assert out == fallback.blurbs(np.array([0, 2]), "red shirt", np.zeros(0, np.int64))
    assert _outcome(outcome) == before + 2  # the bare mug is asked too: it has a title
    assert len(chat.requests) == 2


def test_a_slow_generator_times_out_to_the_extractive_blurb(
    chat: _ChatServer, encoder: MiniLMEncoder
) -> None:
    catalog = shop()
    fallback = ExtractiveBlurbs(catalog, None, encoder.encode)
    blurbs = GeneratedBlurbs(catalog, fallback, chat.url, "m", timeout_s=0.3)
    chat.gate = threading.Event()  # the server holds every answer until the test ends
    before = _outcome("failed")
    out = blurbs.blurbs(np.array([1]), "lamp", np.zeros(0, np.int64))
    assert out == fallback.blurbs(np.array([1]), "lamp", np.zeros(0, np.int64))
    assert _outcome("failed") == before + 1
