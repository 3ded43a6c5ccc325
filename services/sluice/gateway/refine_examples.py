"""The follow-up phrasings the refinement parser has learned from (:mod:`sluice.gateway.refine`).

These are the template splits of ``sluice eval refine`` (:mod:`sluice.eval.refine_tasks`)
that have been run and read: the tuning split and the held-out splits whose failures were
used to widen the parser. Each was frozen when it was committed and is never edited. The
parser compares a follow-up that no rule understood with them, its values masked
(:func:`sluice.gateway.refine.mask`), by MiniLM. A split that is still held out lives in
the evaluation alone, and moves here only once its run has been read.

Placeholders: {price} (whole dollars), {color}, {brand}, {ordinal} (first..fifth), {n}
(1..5), {word}.
"""

from __future__ import annotations

EXAMPLE_TEMPLATES: dict[str, dict[str, tuple[str, ...]]] = {
    "tuning": {
        "cheaper": ("cheaper", "something cheaper please", "show me cheaper ones"),
        "under_price": ("under {price} dollars", "below ${price}", "less than {price} bucks"),
        "color": ("in {color}", "{color} ones", "show me {color}"),
        "not_brand": ("not {brand}", "no {brand}", "without {brand}"),
        "like_nth": ("more like the {ordinal} one", "similar to the {ordinal}", "like #{n}"),
        "add_word": ("{word}", "make it {word}", "only {word} ones"),
    },
    "heldout": {
        "cheaper": (
            "those are too pricey",
            "can I get a lower-cost option",
            "something that costs less",
        ),
        "under_price": ("nothing over {price} dollars", "my budget is ${price}", "max {price}$"),
        "color": ("do you have it in {color}", "I'd prefer {color}", "any {color} ones?"),
        "not_brand": ("anything but {brand}", "I don't like {brand}", "skip {brand}"),
        "like_nth": (
            "show me things like number {n}",
            "the {ordinal} one looks good, more of those",
            "items similar to result {n}",
        ),
        "add_word": ("I want something {word}", "preferably {word}", "a {word} one"),
    },
    # written before the parser was widened with the failures of "heldout"; never tuned on
    "heldout2": {
        "cheaper": (
            "that's out of my price range",
            "anything more affordable?",
            "go lower on price",
        ),
        "under_price": (
            "up to {price} dollars",
            "{price} dollars at most",
            "keep it under {price}",
        ),
        "color": ("what about {color}", "{color} would be nice", "got any in {color}?"),
        "not_brand": ("no more {brand} please", "exclude {brand}", "not a fan of {brand}"),
        "like_nth": (
            "I like the {ordinal} one",
            "more along the lines of #{n}",
            "find me more like item {n}",
        ),
        "add_word": ("it should be {word}", "{word} if possible", "needs to be {word}"),
    },
    # written by a helper that had not seen the parser, before the parser was widened with
    # the failures of "heldout2"; never tuned on
    "heldout3": {
        "cheaper": (
            "these cost way too much",
            "anything more budget-friendly?",
            "hmm, a bit less expensive maybe?",
        ),
        "under_price": (
            "need something below {price} bucks",
            "can't spend more than ${price}",
            "under the {price} mark please",
        ),
        "color": (
            "{color} please",
            "are there {color} versions?",
            "hmm, maybe in {color} instead",
        ),
        "not_brand": (
            "I'd rather avoid {brand}",
            "hide the {brand} stuff",
            "anything other than {brand} please",
        ),
        "like_nth": (
            "ooh the {ordinal} one, got more like that?",
            "more like #{n} pls",
            "anything similar to the {ordinal} result?",
        ),
        "add_word": (
            "looking for {word} specifically",
            "must be {word}",
            "ideally something {word}",
        ),
    },
    # written by a helper that had not seen the parser, before the parser was widened with
    # the failures of "heldout3"; never tuned on
    "heldout4": {
        "cheaper": (
            "any less pricey options?",
            "on a tighter budget, show me cheaper stuff",
            "way too expensive for me lol",
        ),
        "under_price": (
            "${price} or less",
            "sub-{price} options?",
            "don't want to go past {price} dollars",
        ),
        "color": (
            "does it come in {color}?",
            "{color} only pls",
            "can I see the {color} ones",
        ),
        "not_brand": (
            "filter out {brand}",
            "{brand} is a hard pass for me",
            "drop the {brand} results please",
        ),
        "like_nth": (
            "{ordinal} one's perfect, show similar",
            "#{n} is nice, more in that style",
            "alternatives to number {n}?",
        ),
        "add_word": (
            "anything {word}?",
            "something a bit more {word} pls",
            "has to be the {word} kind",
        ),
    },
}
