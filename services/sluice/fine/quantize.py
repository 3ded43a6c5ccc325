"""Compressed variants of a trained fine ranker and their quality/speed trade-off.

* ``int8``: dynamic int8 quantization of every ``nn.Linear`` (weights int8,
  activations quantized on the fly; fbgemm/x86 kernels on CPU).
* ``bf16``: the whole model (weights, embeddings, the text table) in bfloat16.

``python -m sluice.fine.quantize --data /work/shared/data/amazon-beauty --model DIR``
reports HR@10/NDCG@10 on the leave-one-out test targets and the scoring latency
(1 x 200 and 16 x 200 candidates, full 50-item histories) of fp32, int8 and
bf16 side by side. Without ``--model`` a ranker is trained first.
"""

from __future__ import annotations

import argparse
import copy
import io
import logging
import statistics
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from sluice.fine.model import FineRanker, RankerConfig

log = logging.getLogger(__name__)


def quantize_int8(model: FineRanker) -> FineRanker:
    """A copy with dynamically int8-quantized Linear layers (CPU only), in eval mode."""
    from torch.ao.quantization import quantize_dynamic

    with warnings.catch_warnings():  # torch.ao quantization is deprecated in favour of torchao
        warnings.simplefilter("ignore")
        quantized = quantize_dynamic(
            copy.deepcopy(model).cpu().eval(), {nn.Linear}, dtype=torch.qint8
        )
    assert isinstance(quantized, FineRanker)
    return quantized


def to_bf16(model: FineRanker) -> FineRanker:
    """A bfloat16 copy (inputs are cast inside; scores come back as bfloat16), in eval mode."""
    return copy.deepcopy(model).to(torch.bfloat16).eval()


def state_bytes(model: nn.Module) -> int:
    """Serialized size of the state dict plus the (non-persistent) text table."""
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.save(model.state_dict(), buf)
    text = getattr(model, "text_emb", None)
    extra = text.numel() * text.element_size() if isinstance(text, torch.Tensor) else 0
    return buf.getbuffer().nbytes + extra


def score_latency_ms(
    variants: dict[str, FineRanker],
    batch: int,
    candidates: int = 200,
    history: int = 50,
    repeats: int = 50,
    seed: int = 0,
) -> dict[str, float]:
    """Median wall time (ms) of one ``score`` call for ``batch`` users, per variant.

    Calls of the variants are interleaved so load changes on a shared machine
    hit every variant alike.
    """
    first = next(iter(variants.values()))
    gen = torch.Generator().manual_seed(seed)
    hist = torch.randint(1, first.num_items + 1, (batch, history), generator=gen)
    cands = torch.randint(1, first.num_items + 1, (batch, candidates), generator=gen)
    query = torch.zeros(batch, first.cfg.text_dim)
    has = torch.zeros(batch, dtype=torch.bool)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for r in range(repeats + 5):
        for name, model in variants.items():
            t0 = time.perf_counter()
            model.score(hist, cands, query, has)
            if r >= 5:  # warm-up calls are not timed
                times[name].append((time.perf_counter() - t0) * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


def compare(
    variants: dict[str, FineRanker],
    histories: Sequence[np.ndarray],
    targets: np.ndarray,
    batches: Sequence[int] = (1, 16),
    repeats: int = 50,
) -> list[dict[str, float | str]]:
    """Quality (test HR@10/NDCG@10, full ranking), size and latency of each variant."""
    from sluice.eval.metrics import evaluate
    from sluice.fine.train import full_scores

    rows: dict[str, dict[str, float | str]] = {}
    for name, model in variants.items():
        metrics = evaluate(lambda h, m=model: full_scores(m, h).float(), histories, targets)
        rows[name] = {
            "variant": name,
            "HR@10": metrics["HR@10"],
            "NDCG@10": metrics["NDCG@10"],
            "MB": state_bytes(model) / 2**20,
        }
        log.info("variant evaluated", extra={"variant_name": name, **metrics})
    for b in batches:
        for name, ms in score_latency_ms(variants, b, repeats=repeats).items():
            rows[name][f"ms@{b}x200"] = ms
    return list(rows.values())


def main(argv: Sequence[str] | None = None) -> None:
    from sluice.eval.offline import load_split, pseudo_query_table, text_table
    from sluice.fine.train import train_ranker

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--model", type=Path, help="a saved FineRanker; trained if missing")
    parser.add_argument("--epochs", type=int, default=200)
    parser.add_argument("--time-budget", type=float, default=1100.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=RankerConfig.num_threads)
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    split = load_split(args.data)
    if args.model and (args.model / "config.json").exists():
        model = FineRanker.load(args.model)
    else:
        cfg = RankerConfig(num_threads=args.threads)
        model = train_ranker(
            split.train,
            split.num_items,
            text_table(split.catalog),
            cfg,
            epochs=args.epochs,
            seed=args.seed,
            valid_sequences=split.valid_seqs,
            time_budget_s=args.time_budget or None,
            pseudo_queries=pseudo_query_table(split.catalog, 2, args.seed),
        )
        if args.model:
            model.save(args.model)
    torch.set_num_threads(args.threads)
    variants = {
        "fp32": model.eval(),
        "int8 (dynamic)": quantize_int8(model),
        "bf16": to_bf16(model),
    }
    rows = compare(variants, split.test_histories, split.test, repeats=args.repeats)
    print(f"\n{args.data.name}, torch threads {torch.get_num_threads()}")
    print("| variant | HR@10 | NDCG@10 | size MB | ms 1x200 | ms 16x200 |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['variant']} | {r['HR@10']:.4f} | {r['NDCG@10']:.4f} | {r['MB']:.1f} "
            f"| {r['ms@1x200']:.2f} | {r['ms@16x200']:.2f} |"
        )


if __name__ == "__main__":
    main()
