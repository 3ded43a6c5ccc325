"""``sluice eval refine``: multi-turn refinement tasks through the gateway's sessions.

Each task (:mod:`sluice.eval.refine_tasks`) runs as one search session through the gateway's
logic and the four stages in this process (the services' wiring). Every follow-up's first
page is judged against the catalog, not against what the parser says it understood:

- the page holds at least 5 items, and at least 80% of them are of the task's topic (the
  category of its first query);
- every constraint so far holds: under a price, in a colour, not a brand (each on every
  item), cheaper (every item below the median price of the page before it), a word (in at
  least 60% of the titles), more like the n-th item (that item is gone, and the page's mean
  MiniLM similarity to it is above the previous page's).

A task succeeds when every follow-up does. Every split of templates (the tuning phrasings and
the held-out paraphrases, :data:`sluice.eval.refine_tasks.TEMPLATES`) runs the same tasks.
"""

from __future__ import annotations

import json
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sluice.artifacts import Artifacts
from sluice.data.catalog import Catalog
from sluice.eval.refine_tasks import TEMPLATES, Constraint, Task, generate_tasks

MIN_PAGE = 5
TOPIC_SHARE = 0.8
WORD_SHARE = 0.6
PAGE_SIZE = 10


@dataclass
class _Bound:
    """A constraint as judged: with the price bound "cheaper" had when it was asked."""

    constraint: Constraint
    below_cents: float = 0.0


def judge(
    catalog: Catalog,
    vectors: np.ndarray,
    task: Task,
    bounds: list[_Bound],
    previous: list[int],
    page: list[int],
) -> str:
    """ "" when the page satisfies the task so far, else why not."""
    rows = catalog.rows(page)
    if len(page) < MIN_PAGE or (rows < 0).any():
        return f"short page ({len(page)} items)"
    topic = np.mean([catalog.category_of(r) == task.category for r in rows.tolist()])
    if topic < TOPIC_SHARE:
        return f"topic lost ({topic:.0%} of the page is {task.category})"
    prices = catalog.price_cents[rows]
    titles = [f" {catalog.titles[r].lower()} " for r in rows.tolist()]
    for i, b in enumerate(bounds):
        c, current = b.constraint, i == len(bounds) - 1
        if c.kind == "under_price" and prices.max() >= c.price_cents:
            return f"{c.kind}: an item costs {prices.max()} cents"
        if c.kind == "cheaper" and prices.max() >= b.below_cents:
            return f"cheaper: an item costs {prices.max()} cents, not below {b.below_cents:.0f}"
        if c.kind == "color" and any(catalog.color_of(r) != c.color for r in rows.tolist()):
            return f"color: not every item is {c.color}"
        if c.kind == "not_brand" and any(catalog.brand_of(r) == c.brand for r in rows.tolist()):
            return f"not_brand: {c.brand} is on the page"
        if c.kind == "add_word":
            share = np.mean([f" {c.word} " in t for t in titles])
            if share < WORD_SHARE:
                return f"add_word: {share:.0%} of the titles have {c.word!r}"
        if c.kind == "like_nth" and current:
            anchor = previous[c.ordinal - 1]
            if anchor in page:
                return "like_nth: the anchor is still on the page"
            a = vectors[catalog.row(anchor)]
            before = [i for i in previous if i != anchor]
            now = float(np.mean(vectors[rows] @ a))
            then = float(np.mean(vectors[catalog.rows(before)] @ a))
            if now <= then:
                return f"like_nth: no closer to the anchor ({now:.3f} vs {then:.3f})"
    return ""


def run_refine(
    artifacts_root: Path,
    count: int = 300,
    seed: int = 0,
    out: Path | None = None,
    splits: list[str] | None = None,
) -> dict[str, Any]:
    from sluice.embed.onnx import query_encoder
    from sluice.eval.served import in_process_gateway, local_stages
    from sluice.gateway.pipeline import QueryEncoder
    from sluice.gateway.refine import Refiner, Sessions

    artifacts = Artifacts(artifacts_root)
    catalog, vectors = artifacts.catalog, artifacts.text_vectors
    encode = QueryEncoder(query_encoder(artifacts_root).encode)
    gateway = in_process_gateway(artifacts, local_stages(artifacts), encode)
    gateway.sessions = Sessions(Refiner.from_artifacts(artifacts, encode), gateway.users.store)
    tasks = generate_tasks(catalog, count, seed)
    report: dict[str, Any] = {"artifacts": str(artifacts_root), "tasks": len(tasks), "seed": seed}
    print(f"{len(tasks)} tasks on {artifacts_root} ({len(catalog)} items)")
    for split in splits or list(TEMPLATES):
        if split not in TEMPLATES:
            raise ValueError(f"no template split {split!r} (there are {', '.join(TEMPLATES)})")
        t0 = time.perf_counter()
        done, turns_ok = 0, Counter[str]()
        turns_all = Counter[str]()
        failures: defaultdict[str, list[dict[str, Any]]] = defaultdict(list)
        first_on_topic = 0
        for task in tasks:
            session = f"{split}-{task.task_id}"

            def search(text: str, session: str = session) -> list[int]:
                page = gateway.search(
                    query=text, user_id="", page_size=PAGE_SIZE, session_id=session
                )
                ids: list[int] = page.candidates.item_ids.tolist()
                return ids

            previous = search(task.query)
            first_on_topic += judge(catalog, vectors, task, [], [], previous) == ""
            bounds: list[_Bound] = []
            ok = True
            for c, text in zip(task.constraints, task.texts[split], strict=True):
                below = float(np.median(catalog.price_cents[catalog.rows(previous)]))
                bounds.append(_Bound(c, below if c.kind == "cheaper" else 0.0))
                page = search(text)
                why = judge(catalog, vectors, task, bounds, previous, page)
                turns_all[c.kind] += 1
                if why:
                    ok = False
                    failures[c.kind].append({"task": task.task_id, "text": text, "why": why})
                else:
                    turns_ok[c.kind] += 1
                previous = page
            done += ok
        total = sum(turns_all.values())
        section: dict[str, Any] = {
            "task_success": done / len(tasks),
            "turn_success": sum(turns_ok.values()) / total,
            "first_page_on_topic": first_on_topic / len(tasks),
            "by_kind": {
                k: {"turns": turns_all[k], "success": turns_ok[k] / turns_all[k]}
                for k in sorted(turns_all)
            },
            "failures": {k: v[:10] for k, v in failures.items()},
            "failure_reasons": {
                k: dict(Counter(_reason(f["why"]) for f in v)) for k, v in failures.items()
            },
            "seconds": time.perf_counter() - t0,
        }
        report[split] = section
        print(
            f"\n{split}: tasks {section['task_success']:.1%} ({done}/{len(tasks)}), "
            f"turns {section['turn_success']:.1%} ({sum(turns_ok.values())}/{total}); "
            f"first pages on topic {section['first_page_on_topic']:.1%}"
        )
        print("| follow-up | turns | success |\n|---|---|---|")
        for k, v in section["by_kind"].items():
            print(f"| {k} | {v['turns']} | {v['success']:.1%} |")
        for k, v in failures.items():
            print(f"  {k} fails, e.g.: " + "; ".join(f"{f['text']!r}: {f['why']}" for f in v[:3]))
    path = out or artifacts_root.parent / "refine-report.json"
    path.write_text(json.dumps(report, indent=1, default=str))
    print(f"\nreport: {path}")
    return report


def _reason(why: str) -> str:
    """A failure's class: a short page, the topic lost, or the constraint that broke."""
    if why.startswith(("short page", "topic lost")):
        return why.split(" (")[0]
    return "broke " + why.split(":")[0]
