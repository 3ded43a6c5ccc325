"""Conversational refinement: a Search with a ``session_id`` refines the session's last
result instead of starting over.

Each turn's text is parsed by rules, with the MiniLM encoder where rules alone cannot know:
the nearest catalog value of a colour the catalog does not name ("crimson" is red), the
nearest intent prototype of a short follow-up no rule matched ("more affordable" is
cheaper), whether a brand named without a cue is wanted, and, last, the nearest learned
example (:mod:`sluice.gateway.refine_examples`) of a follow-up with its values masked
("sub-36 options?" is "under N dollars"). What a turn understood becomes the session's
constraints:

- ``cheaper`` / ``pricier``: a price bound below / above the median price of the page the
  last turn showed; "under 20 dollars", "over $50", "between 10 and 20 dollars": bounds;
- "in red", "red ones": a colour (``not red``: an excluded colour);
- "not Acme", "without Acme": an excluded brand; "only Acme", "from Acme": the brand;
- "not socks": an excluded category; "in stock": in-stock items only;
- "more like the second one": that item of the last page is the anchor, which pulls the
  query's embedding toward its own (and leaves the page);
- other words: added to the previous query; a word that at least 10 titles of the
  session's topic hold also narrows the result to titles with it ("lightweight"); words
  that name another product on their own start a new topic (the session starts over with
  them);
- "start over", "new search": the session starts over.

A later constraint of a kind replaces the earlier one (a new price bound, a new colour);
exclusions add up. The session's topic is the category of most of its first page; later
turns boost it (``TOPIC_BOOST``), so that a filter does not fill the page from other
categories while the topic still has items. The session state lives in the online store
(``session`` / ``save_session``), keyed by the user and the session id.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from sluice.artifacts import Artifacts
from sluice.convert import MAX_QUERY_CHARS
from sluice.core.errors import InvalidArgument
from sluice.data.catalog import UNKNOWN, Catalog
from sluice.data.filters import MAX_FILTER_VALUES, AttributeFilter
from sluice.domain import Boost
from sluice.gateway.refine_examples import EXAMPLE_TEMPLATES, TRAINING_PARAPHRASES


def _words(text: str) -> frozenset[str]:
    return frozenset(text.split())


MAX_SESSION_ID_CHARS = 128
_SESSION_ID = re.compile(r"^[\x21-\x7e]+$")

# shades a shopper may name, by the colour family a catalog is likelier to list
SHADES = {
    **dict.fromkeys(("crimson", "scarlet", "burgundy", "maroon", "ruby", "cherry"), "red"),
    **dict.fromkeys(("charcoal", "slate", "silver", "gray", "ash"), "grey"),
    **dict.fromkeys(("ebony", "jet", "onyx"), "black"),
    **dict.fromkeys(("azure", "cobalt", "sky", "sapphire", "royal"), "blue"),
    **dict.fromkeys(("ivory", "cream", "snow", "pearl"), "white"),
    **dict.fromkeys(("olive", "lime", "mint", "emerald", "forest", "sage"), "green"),
    **dict.fromkeys(("indigo", "midnight"), "navy"),
}
# other colour words: those the catalog lacks go to its nearest colour by MiniLM ("the color
# X" against "the color Y"), when that is close enough
COLOR_WORDS = _words(
    "black white grey blue navy red green yellow orange pink purple brown beige teal tan "
    "khaki coral gold turquoise cyan magenta violet lavender"
) | set(SHADES)
NEAREST_COLOR_MIN = 0.7
ORDINAL_WORDS = {
    "first": 1, "1st": 1, "second": 2, "2nd": 2, "third": 3, "3rd": 3, "fourth": 4, "4th": 4,
    "fifth": 5, "5th": 5, "sixth": 6, "6th": 6, "seventh": 7, "7th": 7, "eighth": 8, "8th": 8,
    "ninth": 9, "9th": 9, "tenth": 10, "10th": 10, "last": -1,
}  # fmt: skip
# short follow-ups that no rule matched are compared with these (MiniLM); the nearest intent
# above INTENT_MIN is taken
INTENTS: dict[str, tuple[str, ...]] = {
    "cheaper": (
        "cheaper",
        "less expensive",
        "lower price",
        "more affordable",
        "on a budget",
        "too expensive",
        "too pricey",
        "costs less",
        "a lower-cost option",
        "out of my price range",
        "go lower on price",
    ),
    "pricier": ("more expensive", "pricier", "higher end", "better quality, more money"),
    "similar": ("more like this", "similar ones", "more of these"),
    "reset": ("start over", "new search", "something else entirely"),
}
INTENT_MIN = 0.6
# "more like the n-th": the query's embedding plus this much of the item's (then normalised)
ANCHOR_WEIGHT = 4.0
# A brand named with no rule's cue around it: is it wanted or not? The text, with the brand
# as "that brand", against these (MiniLM); the nearer set decides, by at least POLARITY_MARGIN
POLARITY: dict[str, tuple[str, ...]] = {
    "not": (
        "not that brand",
        "no that brand",
        "without that brand",
        "anything but that brand",
        "i don't like that brand",
        "skip that brand",
    ),
    "only": ("only that brand", "from that brand", "by that brand", "that brand only"),
}
POLARITY_MARGIN = 0.03
# A follow-up no rule and no intent understood is compared, its values masked, with the
# learned examples (sluice.gateway.refine_examples, masked the same way); the nearest one's
# kind is taken when the cosine reaches EXAMPLE_MIN and the text holds the value it needs.
EXAMPLE_KINDS = ("cheaper", "under_price", "not_brand", "like_nth")
EXAMPLE_NEEDS = {"under_price": ("N",), "not_brand": ("BRAND",), "like_nth": ("ORD", "N")}
EXAMPLE_MIN = 0.6
ORDINAL_RE = re.compile(
    r"\b(first|second|third|fourth|fifth|sixth|seventh|eighth|ninth|tenth|last"
    r"|1st|2nd|3rd|4th|5th|6th|7th|8th|9th|10th)\b"
)


def _masked_example(template: str) -> str:
    """An example template with its placeholders as the mask's tokens (Refiner.mask)."""
    t = template.format(
        price="N", n="N", ordinal="ORD", brand="BRAND", color="COLOR", word="WORD"
    ).lower()
    for token in ("n", "ord", "brand", "color", "word"):
        t = re.sub(rf"\b{token}\b", token.upper(), t)
    return " ".join(t.replace("$", " ").split())


# A follow-up's words are a new topic when the items nearest to them (MiniLM, over a sample of
# the catalog) mostly share a category that the previous query's nearest items barely have.
TOPIC_ITEMS = 20
TOPIC_SAMPLE = 20_000
MAX_TITLE_WORDS = 8  # narrowing words a session keeps (the latest)
# An added word narrows the result to titles that have it when this many titles of the topic
# do (else it only joins the query)
NARROW_MIN_ITEMS = 10
# Later turns boost the session's topic (the category of most of its first page) by this much
# of the relevance, so that a filter does not fill the page from other categories.
TOPIC_BOOST = 1.0
NEW_TOPIC_SHARE = 0.6  # the follow-up's own category holds this much of its nearest items
OLD_TOPIC_SHARE = 0.15  # and at most this much of the previous query's
# English function words (the common stopword lists) and shopping filler: not query terms
FILLER = _words(
    "a about above after again all am an and any are as at be because been before being "
    "below between both but by can could did do does doing down during each few for from "
    "further had has have having he her here hers him his how i i'd i'll i'm i've if in into "
    "is it it's its itself just let's me more most my myself no nor not now of off on once "
    "only or other our ours out over own same she should so some such than that that's the "
    "their theirs them then there these they this those through to too under until up very "
    "was we were what when where which while who whom why will with would you you'd your "
    "yours show want need like prefer please one ones get got find give see something things "
    "thing items item stuff make look looking"
)

_NUM = r"\$?\s*(\d{1,9}(?:\.\d{1,2})?)\s*\$?"  # at most 9 digits: a float that fits
_CURRENCY = r"(?:\s*(?:dollars?|bucks|usd))?"
# "20", "$20", "20 dollars", "20$", "the $20 (mark)"
_BOUND = rf"(?:\s+the)?{_CURRENCY}\s*{_NUM}{_CURRENCY}"


def _after(words: str, number: str = _BOUND) -> re.Pattern[str]:
    return re.compile(rf"\b(?:{words}){number}")


PRICE_RULES: tuple[tuple[re.Pattern[str], str], ...] = (
    (_after("between", rf"\s+{_NUM}{_CURRENCY}\s+and\s+{_NUM}{_CURRENCY}"), "between"),
    (re.compile(rf"\b{_NUM}\s*(?:-|to)\s*{_NUM}{_CURRENCY}(?=\s|$)"), "between"),
    (_after("under|below|less than|cheaper than|beneath"), "under"),
    # a bound said negatively ("nothing over 50"), or as a budget, is an upper bound
    (
        _after(
            r"(?:nothing|not|none|never|no|can't|cannot|can not|don't|do not|won't)\s+"
            r"(?:\w+\s+){0,2}(?:over|above|more than)"
        ),
        "at_most",
    ),
    (_after(r"budget(?:\s+(?:is|of))?|spend(?:\s+at most)?"), "at_most"),
    (_after("up to|at most|max(?:imum)?|no more than|not more than"), "at_most"),
    # the number first: "50 dollars at most", "20 or less", "30 max", "100 or more"
    (
        re.compile(rf"{_NUM}{_CURRENCY}\s+(?:at most|or less|or under|max(?:imum)?|tops)\b"),
        "at_most",
    ),
    (re.compile(rf"{_NUM}{_CURRENCY}\s+(?:or more|at least|and up|minimum)\b"), "at_least"),
    (_after("over|above|more than|pricier than"), "over"),
    (_after("at least|min(?:imum)?|from", r"\s+\$\s*(\d+(?:\.\d{1,2})?)"), "at_least"),
)
CHEAPER = re.compile(
    r"\b(?:cheaper|less expensive|lower[- ](?:priced?|cost)|more affordable|inexpensive|cheap"
    r"|too (?:expensive|pricey|costly))\b"
)
PRICIER = re.compile(r"\b(?:pricier|more expensive|higher[- ]end|fancier)\b")
RESET = re.compile(r"^(?:start over|new search|reset|forget (?:it|that|this))\b[\s,.:;!-]*")
NEGATION = (
    r"(?:not|no|without|except|excluding|anything but|other than|but not|never|skip"
    r"|(?:i\s+)?(?:don't|do not|dont)\s+(?:like|want|need)|avoid|hide|exclude)"
)
IN_STOCK = re.compile(r"\b(?:in stock|available now|available)\b")
ANCHOR = re.compile(
    r"\b(?:more like|similar to|like|something like|others like|ones like|same as)\s+"
    r"(?:the\s+)?(?:#\s*(\d+)|number\s+(\d+)|(\w+))(?:\s+(?:one|item|result))?\b"
)
# a reference to an item of the last page anywhere in the text: "#3", "number 3", "result 3",
# "the third (one)"; taken as the anchor when the text also asks for similar items
ITEM_REFERENCE = re.compile(
    r"#\s*(\d+)\b|\b(?:number|no\.|item|result|option|product|pick)\s+#?\s*(\d+)\b"
    r"|\b(?:the\s+)?(first|second|third|fourth|fifth|sixth|seventh|eighth|ninth|tenth|last"
    r"|1st|2nd|3rd|4th|5th|6th|7th|8th|9th|10th)(?:\s+(?:one|item|result|option))?\b"
)
SIMILAR_CUE = re.compile(r"\b(?:like|similar|more|same|resembl\w*|closer to)\b")


@dataclass
class Constraints:
    """What the session asks of every item, accumulated over its turns."""

    price_min_cents: int | None = None
    price_max_cents: int | None = None
    color: str = ""
    not_colors: list[str] = field(default_factory=list)
    brand: str = ""
    not_brands: list[str] = field(default_factory=list)
    not_categories: list[str] = field(default_factory=list)
    in_stock: bool = False
    title_words: list[str] = field(default_factory=list)

    def bound(self) -> None:
        """Keep the latest exclusions and words within what a filter may hold, so that a
        long session never outgrows the request limits (at most 7 + MAX_TITLE_WORDS
        filters, and the topic's)."""
        self.not_colors = self.not_colors[-MAX_FILTER_VALUES:]
        self.not_brands = self.not_brands[-MAX_FILTER_VALUES:]
        self.not_categories = self.not_categories[-MAX_FILTER_VALUES:]
        self.title_words = self.title_words[-MAX_TITLE_WORDS:]

    def filters(self) -> tuple[AttributeFilter, ...]:
        out: list[AttributeFilter] = []
        if self.price_min_cents is not None or self.price_max_cents is not None:
            low = None if self.price_min_cents is None else float(self.price_min_cents)
            high = None if self.price_max_cents is None else float(self.price_max_cents)
            out.append(AttributeFilter("price_cents", min=low, max=high))
        if self.color:
            out.append(AttributeFilter("color", any_of=(self.color,)))
        if self.not_colors:
            out.append(AttributeFilter("color", none_of=tuple(self.not_colors)))
        if self.brand:
            out.append(AttributeFilter("brand", any_of=(self.brand,)))
        if self.not_brands:
            out.append(AttributeFilter("brand", none_of=tuple(self.not_brands)))
        if self.not_categories:
            out.append(AttributeFilter("category", none_of=tuple(self.not_categories)))
        if self.in_stock:
            out.append(AttributeFilter("in_stock", equals=True))
        out.extend(AttributeFilter("title_words", any_of=(w,)) for w in self.title_words)
        return tuple(out)


@dataclass
class SessionState:
    """What the online store keeps of a session between turns."""

    text: str = ""  # the last turn's text, as the shopper typed it
    query: str = ""  # the query it searched
    constraints: Constraints = field(default_factory=Constraints)
    anchor_item_id: int = 0
    page_item_ids: list[int] = field(default_factory=list)  # the first page it showed
    turn: int = 0
    topic: str = ""  # the category most of the session's first page had ("": none did)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | None) -> SessionState | None:
        """The state saved by :meth:`to_json`; None for none, or one this version cannot
        read (the session starts over rather than failing the search)."""
        if not text:
            return None
        try:
            raw = json.loads(text)
            raw["constraints"] = Constraints(**raw["constraints"])
            return cls(**raw)
        except (ValueError, TypeError, KeyError):
            return None


@dataclass(frozen=True)
class Turn:
    """One turn understood: what to search, and what changed."""

    query: str
    constraints: Constraints
    anchor_item_id: int
    turn: int
    applied: tuple[str, ...]
    query_embedding: np.ndarray | None = None  # pulled toward the anchor, when there is one
    topic: str = ""  # the session's category, boosted so that refinements keep to it

    @property
    def filters(self) -> tuple[AttributeFilter, ...]:
        """The constraints' filters, and the session's topic: a refinement narrows within it
        (a turn that names another product starts a new topic instead)."""
        topic = (
            ()
            if not self.topic or self.topic in self.constraints.not_categories
            else (AttributeFilter("category", any_of=(self.topic,)),)
        )
        return self.constraints.filters() + topic

    @property
    def boosts(self) -> tuple[Boost, ...]:
        return (Boost(TOPIC_BOOST, category=self.topic),) if self.topic else ()

    def state(self, text: str, page_item_ids: Sequence[int], topic: str) -> SessionState:
        return SessionState(
            text,
            self.query,
            self.constraints,
            self.anchor_item_id,
            list(page_item_ids),
            self.turn,
            topic,
        )


def check_session_id(session_id: str) -> None:
    if len(session_id) > MAX_SESSION_ID_CHARS or not _SESSION_ID.match(session_id):
        raise InvalidArgument(
            f"session_id must be 1 to {MAX_SESSION_ID_CHARS} printable ASCII characters "
            "without spaces",
            field_path="session_id",
        )


class Refiner:
    """Parses a session's turns against one catalog (its colours, brands and categories)."""

    def __init__(
        self, catalog: Catalog, encode: Callable[[str], np.ndarray], item_vectors: np.ndarray
    ) -> None:
        self.catalog = catalog
        self.encode = encode
        self.item_vectors = item_vectors
        self.colors = [c for c in catalog.colors if c != UNKNOWN]
        self.brands = {b.lower(): b for b in catalog.brands if b != UNKNOWN}
        self.categories = {c.lower(): c for c in catalog.categories if c != UNKNOWN}
        # longest names first, so that "Acme Labs" wins over "Acme"
        self._brand_re = _alternation(self.brands)
        self._category_re = _alternation(self.categories)
        words = sorted(set(COLOR_WORDS) | set(self.colors), key=len, reverse=True)
        self._color_re = re.compile(r"\b(" + "|".join(map(re.escape, words)) + r")\b")
        self._color_vectors = (
            np.stack([encode(f"the color {c}") for c in self.colors]) if self.colors else None
        )
        self._intents = [(name, encode(p)) for name, phrases in INTENTS.items() for p in phrases]
        self._polarity = {k: np.stack([encode(p) for p in v]) for k, v in POLARITY.items()}
        pairs = [
            (kind, _masked_example(template))
            for split in (*EXAMPLE_TEMPLATES.values(), TRAINING_PARAPHRASES)
            for kind, templates in split.items()
            if kind in EXAMPLE_KINDS
            for template in templates
        ]
        self._example_kinds = [kind for kind, _ in pairs]
        self._examples = np.stack([encode(text) for _, text in pairs]) if pairs else None
        n = catalog.build_size  # topics are the build's items (rows added live come after)
        sample = (
            np.random.default_rng(0).permutation(n)[:TOPIC_SAMPLE] if n > TOPIC_SAMPLE else None
        )
        self._topic_rows = np.arange(n) if sample is None else np.sort(sample)
        self._topic_vectors = item_vectors[:n] if sample is None else item_vectors[self._topic_rows]
        catalog.rows_with_words("")  # the title-word index, built now rather than on a turn

    @classmethod
    def from_artifacts(cls, artifacts: Artifacts, encode: Callable[[str], np.ndarray]) -> Refiner:
        return cls(artifacts.catalog, encode, artifacts.text_vectors)

    # -- one turn ---------------------------------------------------------------------------
    def refine(self, text: str, state: SessionState | None) -> Turn:
        """The turn ``text`` makes of the session ``state`` (None: its first turn)."""
        t = " ".join(text.lower().replace("\u2019", "'").split())
        applied: list[str] = []
        spans: list[tuple[int, int]] = []
        if state is not None and (m := RESET.match(t)):
            state = None
            spans.append(m.span())
            applied.append("start over")
        c = dataclasses.replace(state.constraints) if state is not None else Constraints()
        c.not_colors, c.not_brands = list(c.not_colors), list(c.not_brands)
        c.not_categories, c.title_words = list(c.not_categories), list(c.title_words)
        page = state.page_item_ids if state is not None else []

        self._prices(t, c, page, spans, applied)
        self._brands(t, c, spans, applied)  # before colours: a brand may be named like one
        self._colors(t, c, spans, applied)
        self._not_categories(t, c, spans, applied)
        if m := IN_STOCK.search(t):
            c.in_stock = True
            spans.append(m.span())
            applied.append("in stock")
        anchor = state.anchor_item_id if state is not None else 0
        if page and (found := self._anchor(t, page, spans)):
            anchor = found
            applied.append(f"like item {anchor}")
        rest = _leftover(t, spans)
        if state is not None:  # a follow-up adds only words the catalog's titles use
            rest = " ".join(w for w in rest.split() if self._known(w))
        if state is not None and not applied:  # nothing by rule: an intent?
            intent = self._intent(t)
            if intent == "reset":
                return self.refine("start over " + text, state)
            if intent in ("cheaper", "pricier") and page:
                self._relative_price(intent, c, page, applied)
                rest = ""
            elif intent == "similar" and page:
                anchor = page[0]
                applied.append(f"like item {anchor}")
                rest = ""
            elif not intent and page and (kind := self._example_kind(t, rest)):
                anchor = self._apply_example(kind, t, c, page, applied) or anchor
                rest = "" if applied else rest

        topic = state.topic if state is not None else ""
        if state is None:
            query = rest or t
        elif rest and self._new_topic(rest, state.query, topic):
            fresh = self.refine(rest, None)  # a new topic: this turn's own constraints only
            query, c, anchor, topic = fresh.query, fresh.constraints, 0, ""
            applied = ["new topic", *applied]
        elif rest:
            query = _combine(state.query, rest)
            applied.append(f"query + {rest}")
            for word in self._narrowing(rest, topic):
                if word not in c.title_words:
                    c.title_words.append(word)
                    applied.append(f"title has {word}")
        else:
            query = state.query
        embedding = self.toward(query, anchor) if anchor else None
        turn = 1 if state is None else state.turn + 1
        c.bound()
        return Turn(query, c, anchor, turn, tuple(applied), embedding, topic)

    def _known(self, word: str) -> bool:
        """Whether some title has ``word`` (or its singular): a word no title has cannot
        match an item, and would only pull the query's meaning off the topic."""
        forms = [word] + ([word[:-1], word[:-2]] if word.endswith("s") else [])
        return any(len(self.catalog.rows_with_words(f)) for f in forms if f)

    def _narrowing(self, rest: str, topic: str) -> list[str]:
        """The added words that narrow the result: words of enough titles of the topic (of
        the catalog, without one) that only items with them are kept."""
        out = []
        for word in rest.split():
            rows = self.catalog.rows_with_words(word)
            if topic in self.categories.values():
                code = self.catalog.categories.index(topic)
                rows = rows[self.catalog.category_codes[rows] == code]
            if len(rows) >= NARROW_MIN_ITEMS:
                out.append(word)
        return out

    def dominant_category(self, item_ids: Sequence[int]) -> str:
        """The category of at least half of ``item_ids``; "" when none has that many."""
        rows = self.catalog.rows(item_ids)
        rows = rows[rows >= 0]
        if len(rows) == 0:
            return ""
        counts = np.bincount(self.catalog.category_codes[rows])
        top = int(np.argmax(counts))
        return self.catalog.categories[top] if counts[top] * 2 >= len(rows) else ""

    # -- rules ------------------------------------------------------------------------------
    def _prices(
        self,
        t: str,
        c: Constraints,
        page: Sequence[int],
        spans: list[tuple[int, int]],
        applied: list[str],
    ) -> None:
        for pattern, kind in PRICE_RULES:
            for m in pattern.finditer(t):
                if _inside(m.span(), spans):
                    continue
                values = [round(float(v) * 100) for v in m.groups() if v is not None]
                if kind == "between":
                    c.price_min_cents, c.price_max_cents = min(values), max(values)
                elif kind == "under":
                    c.price_max_cents = values[0] - 1
                elif kind == "at_most":
                    c.price_max_cents = values[0]
                elif kind == "over":
                    c.price_min_cents = values[0] + 1
                else:
                    c.price_min_cents = values[0]
                _newest_bound_wins(c, upper=kind in ("under", "at_most"))
                spans.append(m.span())
                applied.append(f"price {_bounds(c)}")
        if page:
            for pattern, intent in ((CHEAPER, "cheaper"), (PRICIER, "pricier")):
                if (found := pattern.search(t)) and not _inside(found.span(), spans):
                    spans.append(found.span())
                    self._relative_price(intent, c, page, applied)

    def _relative_price(
        self, intent: str, c: Constraints, page: Sequence[int], applied: list[str]
    ) -> None:
        """Below (cheaper) or above (pricier) the median price of the last page."""
        rows = self.catalog.rows(page)
        prices = self.catalog.price_cents[rows[rows >= 0]]
        if len(prices) == 0:
            return
        median = int(np.median(prices))
        if intent == "cheaper":
            c.price_max_cents = median - 1
        else:
            c.price_min_cents = median + 1
        _newest_bound_wins(c, upper=intent == "cheaper")
        applied.append(f"{intent}: price {_bounds(c)}")

    def _colors(
        self, t: str, c: Constraints, spans: list[tuple[int, int]], applied: list[str]
    ) -> None:
        for m in self._color_re.finditer(t):
            if _inside(m.span(), spans):
                continue
            color = self._nearest_color(m.group(1))
            if not color:
                continue
            start = _negated(t, m.start())
            if start >= 0:
                if color not in c.not_colors:
                    c.not_colors.append(color)
                if c.color == color:
                    c.color = ""
                spans.append((start, m.end()))
                applied.append(f"not {color}")
            else:
                c.color = color
                c.not_colors = [x for x in c.not_colors if x != color]
                spans.append(m.span())
                applied.append(f"color {color}")

    def _nearest_color(self, word: str) -> str:
        """The catalog's colour for a colour word: itself, its family (a shade), or the
        nearest by MiniLM; "" when the catalog has none close enough."""
        for name in (word, SHADES.get(word, ""), {"grey": "gray"}.get(word, "")):
            if name in self.colors:
                return name
        if self._color_vectors is None:
            return ""
        sims = self._color_vectors @ self.encode(f"the color {word}")
        best = int(np.argmax(sims))
        return self.colors[best] if sims[best] >= NEAREST_COLOR_MIN else ""

    def _brands(
        self, t: str, c: Constraints, spans: list[tuple[int, int]], applied: list[str]
    ) -> None:
        found = [(m.span(), self.brands[m.group(1)]) for m in self._brand_re.finditer(t)]
        if not found:  # a misspelt brand after a negation or "only/from/by"
            for m in re.finditer(rf"\b{NEGATION}\s+(?:brand\s+)?([\w' -]+)", t):
                name = difflib.get_close_matches(m.group(1).strip(), self.brands, n=1, cutoff=0.8)
                if name:
                    found.append(((m.start(1), m.end(1)), self.brands[name[0]]))
        for span, brand in found:
            if _inside(span, spans):
                continue
            start = _negated(t, span[0])
            if start >= 0:
                _exclude_brand(c, brand, applied)
                spans.append((start, span[1]))
                continue
            before, after = t[: span[0]], t[span[1] :]
            if re.search(r"\b(?:only|brand)\s+(?:the\s+)?$", before) or re.match(
                r"\s+(?:only|brand)\b", after
            ):
                polarity = "only"
            elif re.search(r"\b(?:from|by)\s+(?:the\s+)?$", before):
                # weak cues: "remove anything made by X" is nearest to an exclusion
                polarity = "not" if self._example_kind(t) == "not_brand" else "only"
            else:
                polarity = self._brand_polarity(t, span)
            if polarity == "only":
                c.brand = brand
                c.not_brands = [b for b in c.not_brands if b != brand]
                spans.append(span)
                applied.append(f"brand {brand}")
            elif polarity == "not":
                _exclude_brand(c, brand, applied)
                spans.append((0, len(t)) if len(t.split()) <= 6 else span)

    def _not_categories(
        self, t: str, c: Constraints, spans: list[tuple[int, int]], applied: list[str]
    ) -> None:
        for m in self._category_re.finditer(t):
            start = _negated(t, m.start())
            if start < 0 or _inside(m.span(), spans):
                continue
            category = self.categories[m.group(1)]
            if category not in c.not_categories:
                c.not_categories.append(category)
            spans.append((start, m.end()))
            applied.append(f"not category {category}")

    def _anchor(self, t: str, page: Sequence[int], spans: list[tuple[int, int]]) -> int:
        for m in ANCHOR.finditer(t):
            number, numbered, word = m.groups()
            position = int(number or numbered) if (number or numbered) else ORDINAL_WORDS.get(word)
            if not position or position > len(page) or _inside(m.span(), spans):
                continue
            spans.append(m.span())
            return int(page[position - 1] if position > 0 else page[-1])
        if not SIMILAR_CUE.search(t):
            return 0
        for m in ITEM_REFERENCE.finditer(t):  # "items similar to result 4", "the second one..."
            number, numbered, word = m.groups()
            position = int(number or numbered) if (number or numbered) else ORDINAL_WORDS[word]
            if position and position <= len(page) and not _inside(m.span(), spans):
                spans.append((0, len(t)))
                return int(page[position - 1] if position > 0 else page[-1])
        return 0

    # -- the encoder ------------------------------------------------------------------------
    def mask(self, text: str) -> str:
        """``text`` with its values as the examples' tokens: brands BRAND, colours COLOR,
        ordinals ORD, numbers N (prices and positions alike)."""
        t = self._brand_re.sub(" BRAND ", text)
        t = self._color_re.sub(" COLOR ", t)
        t = ORDINAL_RE.sub(" ORD ", t)
        t = re.sub(r"\d+(?:\.\d+)?", " N ", t)
        return " ".join(t.split())

    def _example_kind(self, t: str, rest: str = "") -> str:
        """The kind of the learned example nearest to ``t`` masked (MiniLM), when it is near
        enough and ``t`` holds the value that kind needs; "" otherwise. A kind that needs no
        value (cheaper) is not taken over words that some title has (``rest``): they are
        more likely a word to add ("premium")."""
        masked = self.mask(t)
        if self._examples is None or len(masked.split()) > 12:
            return ""
        sims = self._examples @ self.encode(masked)
        best = int(np.argmax(sims))
        if sims[best] < EXAMPLE_MIN:
            return ""
        kind = self._example_kinds[best]
        needs = EXAMPLE_NEEDS.get(kind, ())
        if not needs:
            return "" if rest else kind
        return kind if set(needs) & set(masked.split()) else ""

    def _apply_example(
        self, kind: str, t: str, c: Constraints, page: Sequence[int], applied: list[str]
    ) -> int:
        """What an example's kind does with the values of ``t``; the anchor for like_nth."""
        if kind == "cheaper":
            self._relative_price("cheaper", c, page, applied)
        elif kind == "under_price" and (m := re.search(r"\d{1,9}(?:\.\d{1,2})?", t)):
            c.price_max_cents = round(float(m.group()) * 100)
            _newest_bound_wins(c, upper=True)
            applied.append(f"price {_bounds(c)}")
        elif kind == "not_brand":
            for m in self._brand_re.finditer(t):
                _exclude_brand(c, self.brands[m.group(1)], applied)
        elif kind == "like_nth":
            ordinal, number = ORDINAL_RE.search(t), re.search(r"\d+", t)
            position = ORDINAL_WORDS[ordinal.group(1)] if ordinal else 0
            position = position or (int(number.group()) if number else 0)
            if position and position <= len(page):
                anchor = int(page[position - 1] if position > 0 else page[-1])
                applied.append(f"like item {anchor}")
                return anchor
        return 0

    def _brand_polarity(self, t: str, span: tuple[int, int]) -> str:
        """Whether the text around a brand no rule decided asks for it ("only"), against it
        ("not"), or neither (""), by its nearest prototypes (MiniLM)."""
        framed = (t[: span[0]] + "that brand" + t[span[1] :]).strip()
        if framed == "that brand" or len(framed.split()) > 10:
            return ""
        q = self.encode(framed)
        best = {k: float(np.max(v @ q)) for k, v in self._polarity.items()}
        ranked = sorted(best, key=best.__getitem__, reverse=True)
        return ranked[0] if best[ranked[0]] - best[ranked[1]] >= POLARITY_MARGIN else ""

    def _intent(self, t: str) -> str:
        if len(t.split()) > 8:
            return ""
        q = self.encode(t)
        best, score = "", INTENT_MIN
        for name, vector in self._intents:
            sim = float(vector @ q)
            if sim >= score:
                best, score = name, sim
        return best

    def _topic(self, text: str) -> np.ndarray:
        """Category shares among the items nearest to ``text``."""
        sims = self._topic_vectors @ self.encode(text)
        k = min(TOPIC_ITEMS, len(sims))
        nearest = self._topic_rows[np.argpartition(-sims, k - 1)[:k]] if k else []
        codes = self.catalog.category_codes[nearest]
        return np.bincount(codes, minlength=len(self.catalog.categories)) / max(k, 1)

    def _new_topic(self, rest: str, query: str, topic: str) -> bool:
        """``rest`` on its own names products of a category that ``query`` barely reaches,
        and its words do not narrow the session's topic (see ``_narrowing``)."""
        if topic and len(self._narrowing(rest, topic)) == len(rest.split()):
            return False
        mine = self._topic(rest)
        top = int(np.argmax(mine))
        return bool(mine[top] >= NEW_TOPIC_SHARE and self._topic(query)[top] <= OLD_TOPIC_SHARE)

    def toward(self, query: str, anchor: int) -> np.ndarray | None:
        row = self.catalog.row(anchor)
        if row < 0:
            return None
        v = self.encode(query) + ANCHOR_WEIGHT * self.item_vectors[row]
        return (v / max(float(np.linalg.norm(v)), 1e-9)).astype(np.float32)


def _alternation(names: dict[str, str]) -> re.Pattern[str]:
    ordered = sorted(names, key=len, reverse=True)
    if not ordered:
        return re.compile(r"(?!x)x")
    return re.compile(r"(?<!\w)(" + "|".join(map(re.escape, ordered)) + r")(?!\w)")


def _negated(t: str, start: int) -> int:
    """Where the negation before ``start`` begins (within three words), else -1."""
    before = t[:start]
    m = re.search(rf"\b{NEGATION}\s+(?:\w+\s+){{0,2}}$", before)
    return m.start() if m else -1


def _inside(span: tuple[int, int], spans: Sequence[tuple[int, int]]) -> bool:
    return any(a < span[1] and span[0] < b for a, b in spans)


def _leftover(t: str, spans: Sequence[tuple[int, int]]) -> str:
    """The words no rule used, without filler."""
    keep = [ch if not any(a <= i < b for a, b in spans) else " " for i, ch in enumerate(t)]
    words = re.findall(r"[\w'-]+", "".join(keep))
    return " ".join(w for w in words if w not in FILLER and not w.isdigit())


def _combine(query: str, rest: str) -> str:
    """``query`` and the words of ``rest`` it lacks, within what a stage accepts."""
    seen = set(query.split())
    combined = " ".join([query, *[w for w in rest.split() if w not in seen]])
    return combined if len(combined) <= MAX_QUERY_CHARS else query


def _newest_bound_wins(c: Constraints, upper: bool) -> None:
    """When the bound just set (the upper one, or the lower) contradicts the session's other
    bound, drop the other: a filter with min above max would fail the search."""
    low, high = c.price_min_cents, c.price_max_cents
    if low is not None and high is not None and low > high:
        if upper:
            c.price_min_cents = None
        else:
            c.price_max_cents = None


def _exclude_brand(c: Constraints, brand: str, applied: list[str]) -> None:
    if brand not in c.not_brands:
        c.not_brands.append(brand)
    if c.brand == brand:
        c.brand = ""
    applied.append(f"not brand {brand}")


def _bounds(c: Constraints) -> str:
    low = "" if c.price_min_cents is None else f"{c.price_min_cents} <= "
    high = "" if c.price_max_cents is None else f" <= {c.price_max_cents}"
    return f"{low}cents{high}"


class SessionStore(Protocol):
    """Where sessions live between turns: the online state store."""

    def session(self, user_id: str, session_id: str) -> str | None: ...

    def save_session(self, user_id: str, session_id: str, state: str) -> None: ...


@dataclass
class Sessions:
    """Search sessions: their state in the online store, their turns parsed by ``refiner``."""

    refiner: Refiner
    store: SessionStore

    def turn(self, user_id: str, session_id: str, text: str, paging: bool) -> Turn:
        """The turn ``text`` makes in the session. The next page of the same turn
        (``paging``, the same text) is that turn again, not a further refinement."""
        check_session_id(session_id)
        state = SessionState.from_json(self.store.session(user_id, session_id))
        if paging and state is not None and state.text == text:
            embedding = (
                self.refiner.toward(state.query, state.anchor_item_id)
                if state.anchor_item_id
                else None
            )
            return Turn(
                state.query,
                state.constraints,
                state.anchor_item_id,
                state.turn,
                (),
                embedding,
                state.topic,
            )
        return self.refiner.refine(text, state)

    def save(
        self, user_id: str, session_id: str, text: str, turn: Turn, page: Sequence[int]
    ) -> None:
        topic = turn.topic or self.refiner.dominant_category(page)
        self.store.save_session(user_id, session_id, turn.state(text, page, topic).to_json())
