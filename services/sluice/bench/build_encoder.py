"""Build-time text encoding side by side: what a large ``sluice build`` spends on MiniLM.

``python -m sluice.bench.build_encoder --items 1000000 --long-texts DIR`` (DIR: a products
catalog such as ``../shared/data/crowdflower-search``; optional)

The build embeds every item text (``Catalog.text``) and two pseudo-queries per item (1 to 4
title words, ``sluice.fine.train.pseudo_query_texts``). This generates the shop of
``--items`` items (titles do not depend on ``--users``), counts its distinct item texts and
pseudo-queries, and encodes a random sample of each distinct set with

* ``torch-fp32``: sentence-transformers, what ``--encoder minilm`` (the default) runs;
* ``onnx-fp32``: the build's ONNX export (the gateway's query encoder);
* ``onnx-int8-len{N}``: that export dynamically quantized to int8 (what ``--encoder
  minilm-int8`` runs), texts truncated at N tokens;

all on every core of this process, the encoders taking turns chunk by chunk so that machine
noise falls on all of them alike. With ``--long-texts DIR`` (a products catalog such as
CrowdFlower's: titles and long descriptions) the same is done on that catalog's texts,
where the token limit bites. Reported per encoder: texts/s, cosine to ``torch-fp32``
(the default build's vectors), and the projected seconds for the shop's text table and
pseudo-queries, every text encoded and each distinct text once. The load average
(``os.getloadavg``) is recorded before and after each measurement, since the machine is
shared.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sluice import paths
from sluice.embed.text import TextEncoder

LENGTHS = (256, 128, 64)
REFERENCE = "torch-fp32"


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _rss_gib() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)


def encoders(
    tmp: Path, threads: int, lengths: Sequence[int]
) -> tuple[dict[str, TextEncoder], dict[str, float]]:
    """Every variant, and the one-off seconds of the ONNX export and of the quantization."""
    import torch

    from sluice.embed.onnx import (
        ONNX_FILE,
        TOKENIZER_FILE,
        OnnxMiniLMEncoder,
        export_onnx,
        quantize_int8,
    )
    from sluice.embed.text import MiniLMEncoder

    torch.set_num_threads(threads)
    t = time.perf_counter()
    fp32 = export_onnx(tmp / "fp32" / ONNX_FILE)
    one_off = {"export_fp32_s": round(time.perf_counter() - t, 1)}
    t = time.perf_counter()
    (tmp / "int8").mkdir()
    int8 = quantize_int8(fp32, tmp / "int8" / ONNX_FILE)
    shutil.copy(fp32.parent / TOKENIZER_FILE, int8.parent / TOKENIZER_FILE)
    one_off["quantize_int8_s"] = round(time.perf_counter() - t, 1)
    out: dict[str, TextEncoder] = {
        REFERENCE: MiniLMEncoder(device="cpu", threads=threads),
        "onnx-fp32": OnnxMiniLMEncoder(fp32, threads=threads),
    }
    for n in lengths:
        out[f"onnx-int8-len{n}"] = OnnxMiniLMEncoder(int8, threads=threads, max_length=n)
    return out, one_off


def side_by_side(
    models: dict[str, TextEncoder],
    texts: Sequence[str],
    batch_size: int,
    rounds: int,
) -> dict[str, dict[str, Any]]:
    """Texts/s of each encoder (taking turns chunk by chunk) and its cosine to the reference."""
    for model in models.values():  # warm up
        model.encode(list(texts[:32]), batch_size=batch_size)
    names = list(models)
    seconds = dict.fromkeys(names, 0.0)
    vectors: dict[str, list[np.ndarray]] = {n: [] for n in names}
    load_before = _load()
    for i, chunk in enumerate(np.array_split(np.arange(len(texts)), rounds)):
        part = [texts[j] for j in chunk]
        for name in names[i % len(names) :] + names[: i % len(names)]:  # rotate who goes first
            t = time.perf_counter()
            vectors[name].append(models[name].encode(part, batch_size=batch_size))
            seconds[name] += time.perf_counter() - t
    load_after = _load()
    ref = np.concatenate(vectors[REFERENCE])
    out: dict[str, dict[str, Any]] = {}
    for name in names:
        v = np.concatenate(vectors[name])
        cosine = (v * ref).sum(axis=1)
        out[name] = {
            "texts_per_s": round(len(texts) / seconds[name], 1),
            "cosine_min": round(float(cosine.min()), 4),
            "cosine_p1": round(float(np.percentile(cosine, 1)), 4),
            "cosine_mean": round(float(cosine.mean()), 4),
            "norm_max_error": float(np.abs(np.linalg.norm(v, axis=1) - 1.0).max()),
        }
    out["_"] = {"texts": len(texts), "batch_size": batch_size, "load": [load_before, load_after]}
    return out


def _sample(texts: Sequence[str], n: int, rng: np.random.Generator) -> list[str]:
    pick = rng.choice(len(texts), size=min(n, len(texts)), replace=False)
    return [texts[i] for i in pick]


def _table(title: str, rows: dict[str, dict[str, Any]], extra: str = "") -> list[str]:
    meta = rows["_"]
    lines = [
        f"\n{title}: {meta['texts']} texts, batch {meta['batch_size']}, "
        f"load {meta['load'][0]} -> {meta['load'][1]}{extra}",
        "| encoder | texts/s | x torch-fp32 | cosine to torch-fp32 (min / p1 / mean) |",
        "|---|---|---|---|",
    ]
    base = rows[REFERENCE]["texts_per_s"]
    for name, r in rows.items():
        if name == "_":
            continue
        lines.append(
            f"| {name} | {r['texts_per_s']:.0f} | {r['texts_per_s'] / base:.2f} | "
            f"{r['cosine_min']:.4f} / {r['cosine_p1']:.4f} / {r['cosine_mean']:.4f} |"
        )
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    from sluice.bench.load import machine_info
    from sluice.data.synthetic import ShopSpec, generate_shop
    from sluice.embed.batch import cores, distinct
    from sluice.fine.train import pseudo_query_texts

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--items", type=int, default=1_000_000, help="generated shop: items")
    ap.add_argument("--users", type=int, default=1000, help="generated shop: users")
    ap.add_argument(
        "--seed", type=int, default=0, help="the shop's and the pseudo-queries' (sluice build's)"
    )
    ap.add_argument("--sample", type=int, default=2000, help="distinct item texts to encode")
    ap.add_argument("--pseudo-sample", type=int, default=4000, help="distinct pseudo-queries")
    ap.add_argument("--long-texts", type=Path, help="a products dataset (crowdflower-search)")
    ap.add_argument("--long-sample", type=int, default=300)
    ap.add_argument("--lengths", default=",".join(map(str, LENGTHS)), help="int8 token limits")
    ap.add_argument("--threads", type=int, default=cores(), help="default: every core")
    ap.add_argument("--rounds", type=int, default=4, help="chunks the encoders take turns on")
    ap.add_argument("--out", type=Path, default=paths.var("bench", "build-encoder"))
    args = ap.parse_args(argv)
    lengths = [int(x) for x in args.lengths.split(",") if x]
    rng = np.random.default_rng(0)
    result: dict[str, Any] = {
        "command": "python -m sluice.bench.build_encoder "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine_info(),
        "threads": args.threads,
    }
    lines: list[str] = []

    def say(line: str) -> None:
        lines.append(line)
        print(line, flush=True)

    load = _load()
    t = time.perf_counter()
    catalog, _ = generate_shop(ShopSpec(num_items=args.items, num_users=args.users, seed=args.seed))
    shop: dict[str, Any] = {
        "items": args.items,
        "users": args.users,
        "generate_s": round(time.perf_counter() - t, 1),
        "generate_load": [load, _load()],
        "peak_rss_gib_after_generate": _rss_gib(),
    }
    t = time.perf_counter()
    item_texts = [catalog.text(r) for r in range(len(catalog))]
    items, _inv = distinct(item_texts)
    shop["item_texts_s"] = round(time.perf_counter() - t, 1)
    t = time.perf_counter()
    pseudo_texts = pseudo_query_texts(catalog.titles, 2, args.seed)
    shop["pseudo_texts_s"] = round(time.perf_counter() - t, 1)
    t = time.perf_counter()
    pseudo, _inv = distinct(pseudo_texts)
    shop["pseudo_distinct_s"] = round(time.perf_counter() - t, 1)
    shop.update(
        item_texts=len(item_texts),
        distinct_item_texts=len(items),
        pseudo_queries=len(pseudo_texts),
        distinct_pseudo_queries=len(pseudo),
        peak_rss_gib=_rss_gib(),
    )
    del _inv
    result["shop"] = shop
    say(
        f"shop of {args.items:,} items ({args.users:,} users): generated in "
        f"{shop['generate_s']} s (load {shop['generate_load'][0]} -> "
        f"{shop['generate_load'][1]}), peak RSS {shop['peak_rss_gib']} GiB; "
        f"distinct item texts {len(items):,} ({len(items) / len(item_texts):.1%}), "
        f"distinct pseudo-queries {len(pseudo):,} of {len(pseudo_texts):,} "
        f"({len(pseudo) / len(pseudo_texts):.1%}); pseudo-query texts made in "
        f"{shop['pseudo_texts_s']} s"
    )
    item_sample = _sample(items, args.sample, rng)
    pseudo_sample = _sample(pseudo, args.pseudo_sample, rng)
    del catalog, item_texts, pseudo_texts

    with tempfile.TemporaryDirectory(prefix="sluice-bench-encoder-") as tmp:
        models, one_off = encoders(Path(tmp), args.threads, lengths)
        result["one_off"] = one_off
        say(
            f"one-off: ONNX export {one_off['export_fp32_s']} s, int8 quantization "
            f"{one_off['quantize_int8_s']} s (load {_load()})"
        )
        result["items"] = side_by_side(models, item_sample, 128, args.rounds)
        for line in _table("generated-shop item texts (distinct)", result["items"]):
            say(line)
        result["pseudo"] = side_by_side(models, pseudo_sample, 256, args.rounds)
        for line in _table("pseudo-queries (distinct)", result["pseudo"]):
            say(line)
        if args.long_texts:
            from sluice.data.products import load_products

            products = load_products(args.long_texts)
            long_texts = _sample(
                [products.text(r) for r in range(len(products))], args.long_sample, rng
            )
            result["long"] = side_by_side(models, long_texts, 128, args.rounds)
            result["long"]["_"]["dataset"] = str(args.long_texts)
            for line in _table(f"{args.long_texts.name} title + description", result["long"]):
                say(line)

    # the shop's text table + pseudo-queries: every text (today) or each distinct text once
    projection = {}
    say(
        f"\nprojected encoding time for the {args.items:,}-item shop "
        "(text table + 2 pseudo-queries per item; the rates above)"
    )
    say("| encoder | every text | each distinct text once |")
    say("|---|---|---|")
    for name in result["items"]:
        if name == "_":
            continue
        ri, rp = result["items"][name]["texts_per_s"], result["pseudo"][name]["texts_per_s"]
        every = shop["item_texts"] / ri + shop["pseudo_queries"] / rp
        once = shop["distinct_item_texts"] / ri + shop["distinct_pseudo_queries"] / rp
        projection[name] = {"every_text_s": round(every), "distinct_s": round(once)}
        say(f"| {name} | {every / 60:.1f} min | {once / 60:.1f} min |")
    result["projection"] = projection
    result["load_end"] = _load()
    say(f"load average at the end: {result['load_end']}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "build-encoder.json").write_text(json.dumps(result, indent=1))
    (args.out / "build-encoder.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out / 'build-encoder.json'}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
