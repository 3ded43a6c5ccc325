"""Training of the fine ranker: SASRec with full softmax cross-entropy.

Every position of every training sequence predicts the next item against the
whole catalog (no negative sampling). Sequences longer than ``max_len + 1`` are
cut into windows that overlap by one item, so each transition is a target
exactly once per epoch. Batches group sequences of similar length so little
compute goes to padding.

Search: with probability ``cfg.query_prob`` a training position gets a
pseudo-query, the MiniLM embedding of a random subset of its target's title
words (precomputed by :func:`make_pseudo_queries`): it is added to that
position's input and its cosine to every title, times the learned
``query_scale``, to that position's logits, so the ``has_query=True`` path
learns to use the query.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from sluice.embed.text import TextEncoder
from sluice.eval.metrics import evaluate
from sluice.fine.model import FineRanker, RankerConfig, pad_histories

log = logging.getLogger(__name__)


def pseudo_query_texts(titles: Sequence[str], per_item: int, seed: int) -> list[str]:
    """``per_item`` queries per title: 1..4 of its words, in title order (item-major)."""
    rng = np.random.default_rng(seed)
    texts: list[str] = []
    for title in titles:
        words = title.split() or ["item"]
        for _ in range(per_item):
            k = int(rng.integers(1, min(4, len(words)) + 1))
            pick = np.sort(rng.choice(len(words), size=k, replace=False))
            texts.append(" ".join(words[i] for i in pick).lower())
    return texts


def make_pseudo_queries(
    titles: Sequence[str],
    encoder: TextEncoder,
    per_item: int = 2,
    seed: int = 0,
    progress: bool = False,
) -> np.ndarray:
    """Pseudo-query embeddings ``[num_items + 1, per_item, dim]`` by dense index (row 0 zeros)."""
    texts = pseudo_query_texts(titles, per_item, seed)
    vectors = encoder.encode(texts, batch_size=256, progress=progress)
    out = np.zeros((len(titles) + 1, per_item, vectors.shape[1]), dtype=np.float32)
    out[1:] = vectors.reshape(len(titles), per_item, -1)
    return out


def _windows(sequences: Sequence[np.ndarray], max_len: int) -> list[np.ndarray]:
    """Dense-index windows of at most ``max_len + 1`` items, overlapping by one."""
    out: list[np.ndarray] = []
    for seq in sequences:
        dense = np.asarray(seq, dtype=np.int64) + 1
        end = len(dense)
        while end >= 2:
            out.append(dense[max(0, end - max_len - 1) : end])
            end -= max_len
    return out


def _batches(
    windows: list[np.ndarray], batch_size: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """Shuffled batches of window indices with similar lengths."""
    order = rng.permutation(len(windows))
    chunk = batch_size * 32
    batches: list[np.ndarray] = []
    for start in range(0, len(order), chunk):
        part = order[start : start + chunk]
        part = part[np.argsort([len(windows[i]) for i in part], kind="stable")]
        batches.extend(part[i : i + batch_size] for i in range(0, len(part), batch_size))
    return [batches[i] for i in rng.permutation(len(batches))]


@torch.inference_mode()
def full_scores(
    model: FineRanker,
    histories: Sequence[np.ndarray],
    query_emb: np.ndarray | None = None,
) -> torch.Tensor:
    """Scores ``[B, num_items]`` over catalog rows for histories of catalog rows."""
    hist = pad_histories([np.asarray(h, dtype=np.int64) + 1 for h in histories], model.cfg.max_len)
    if query_emb is None:
        q = torch.zeros(len(histories), model.cfg.text_dim)
        has = torch.zeros(len(histories), dtype=torch.bool)
    else:
        q = torch.from_numpy(np.asarray(query_emb, dtype=np.float32))
        has = torch.ones(len(histories), dtype=torch.bool)
    return model.score_all(hist, q, has)[:, 1:]


def _validate(model: FineRanker, valid_sequences: Sequence[np.ndarray]) -> dict[str, float]:
    hist = [np.asarray(s[:-1]) for s in valid_sequences]
    tgt = np.array([s[-1] if len(s) >= 2 else -1 for s in valid_sequences], dtype=np.int64)
    return evaluate(lambda h: full_scores(model, h), hist, tgt, ks=(10,))


def train_ranker(
    sequences: Sequence[np.ndarray],
    num_items: int,
    text_emb: np.ndarray | None,
    cfg: RankerConfig | None = None,
    *,
    epochs: int = 200,
    seed: int = 0,
    valid_sequences: Sequence[np.ndarray] | None = None,
    progress: bool = True,
    time_budget_s: float | None = None,
    pseudo_queries: np.ndarray | None = None,
) -> FineRanker:
    """Train a :class:`FineRanker` and return it in eval mode.

    ``sequences`` are catalog rows per user in time order. ``valid_sequences``
    (catalog rows; the last item of each is the validation target, the rest its
    history) enable early stopping on NDCG@10, and the best epoch's weights are
    returned. ``time_budget_s`` stops training before an epoch that would not
    fit. ``pseudo_queries`` ``[num_items + 1, n, text_dim]`` enables search
    training (see :func:`make_pseudo_queries`).
    """
    cfg = cfg or RankerConfig()
    started = time.perf_counter()
    torch.manual_seed(seed)
    np.random.seed(seed)
    rng = np.random.default_rng(seed)
    if cfg.num_threads > 0:
        torch.set_num_threads(cfg.num_threads)
    model = FineRanker(num_items, text_emb, cfg)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "pos_emb" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "pos_emb" not in n)]
    optim = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": cfg.weight_decay},
            {"params": rest, "weight_decay": 0.0},
        ],
        lr=cfg.lr,
    )
    windows = _windows(sequences, cfg.max_len)
    use_query = pseudo_queries is not None and cfg.query_prob > 0
    pq = torch.from_numpy(np.asarray(pseudo_queries, dtype=np.float32)) if use_query else None
    best_score, best_state, best_epoch, stale = -1.0, None, -1, 0
    epoch_times: list[float] = []  # training only
    round_times: list[float] = []  # training + validation, for the time budget
    for epoch in range(epochs):
        elapsed = time.perf_counter() - started
        if time_budget_s is not None and epoch_times and elapsed + max(round_times) > time_budget_s:
            log.info("time budget reached", extra={"epoch": epoch})
            break
        t0 = time.perf_counter()
        model.train()
        total, count = 0.0, 0
        bar = tqdm(
            _batches(windows, cfg.batch_size, rng),
            desc=f"epoch {epoch + 1}",
            disable=not progress,
            leave=False,
        )
        for batch in bar:
            seqs = pad_histories([windows[i] for i in batch], cfg.max_len + 1)
            inputs, targets = seqs[:, :-1], seqs[:, 1:]
            targets = torch.where(inputs > 0, targets, torch.zeros_like(targets))
            is_target = targets > 0
            q_emb, q_mask = None, None
            if pq is not None:
                q_mask = is_target & (torch.rand(targets.shape) < cfg.query_prob)
                picked = targets[q_mask]
                variant = torch.randint(pq.shape[1], picked.shape)
                q_emb = torch.zeros(*targets.shape, pq.shape[2])
                q_emb[q_mask] = pq[picked, variant]
            table = model.all_item_vectors()
            hidden = model._hidden(inputs, q_emb, q_mask, item_table=table)[is_target]
            logits = hidden @ table[1:].T  # every real item; padding is never a class
            labels = targets[is_target] - 1
            if q_emb is not None and q_mask is not None and model.query_scale is not None:
                q_rows = q_mask[is_target]  # target rows that have a query, in the same order
                cos = q_emb[q_mask] @ model.text_emb[1:].T
                logits = torch.cat([logits[~q_rows], logits[q_rows] + model.query_scale * cos])
                labels = torch.cat([labels[~q_rows], labels[q_rows]])
            loss = F.cross_entropy(logits, labels, label_smoothing=cfg.label_smoothing)
            optim.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optim.step()
            n = int(is_target.sum())
            total += float(loss.detach()) * n
            count += n
            bar.set_postfix(loss=f"{total / max(count, 1):.3f}")
        epoch_times.append(time.perf_counter() - t0)
        info: dict[str, float] = {"epoch": epoch + 1, "loss": total / max(count, 1)}
        if valid_sequences is not None and (epoch + 1) % cfg.eval_every == 0:
            metrics = _validate(model, valid_sequences)
            info |= {"val_hr10": metrics["HR@10"], "val_ndcg10": metrics["NDCG@10"]}
            if metrics["NDCG@10"] > best_score:
                best_score, best_epoch, stale = metrics["NDCG@10"], epoch + 1, 0
                best_state = copy.deepcopy(model.state_dict())
            else:
                stale += 1
        info["epoch_s"] = epoch_times[-1]
        info["val_s"] = time.perf_counter() - t0 - epoch_times[-1]
        log.info("epoch done", extra=info)
        if progress:
            tqdm.write(
                " ".join(
                    f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in info.items()
                )
            )
        round_times = [*round_times[-2:], time.perf_counter() - t0]
        if stale >= cfg.patience:
            log.info("early stop", extra={"best_epoch": best_epoch})
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    model.train_info = {
        "best_epoch": best_epoch,
        "epochs_run": len(epoch_times),
        "best_val_ndcg10": best_score,
        "seconds": time.perf_counter() - started,
    }
    log.info(
        "training done",
        extra={
            "seconds": time.perf_counter() - started,
            "best_epoch": best_epoch,
            "best_val_ndcg10": best_score,
        },
    )
    return model.eval()
