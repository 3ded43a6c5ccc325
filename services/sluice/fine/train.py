"""Training of the fine ranker: SASRec with a full or a sampled softmax.

Every position of every training sequence predicts the next item. Sequences
longer than ``max_len + 1`` are cut into windows that overlap by one item, so
each transition is a target exactly once per epoch. Batches group sequences of
similar length so little compute goes to padding.

``cfg.loss == "full"``: cross-entropy against the whole catalog. Exact, but each
step computes every item's vector and a ``positions x items`` logit matrix.

``cfg.loss == "sampled"``: the sampling-bias-corrected softmax (Jean et al.
2015; Yi et al. 2019). Each position's candidates are its own target, the
batch's other targets (in-batch negatives, drawn in proportion to how often an
item is a training target) and ``num_negatives`` negatives shared by the batch,
drawn with replacement from a proposal ``Q`` (log-uniform over the items'
training-popularity rank, or uniform). Every logit, the target's included, is
corrected by ``- log E[count]``, the item's expected number of occurrences among
the shared candidates (``N * unigram + K * Q``), which makes the sampled
partition function an unbiased estimate of the full one. A shared candidate
equal to the row's own target (an accidental hit) is masked to ``-inf``. Only
the item vectors of the batch's histories and candidates are computed.

Search: with probability ``cfg.query_prob`` a training position gets a
pseudo-query, the MiniLM embedding of a random subset of its target's title
words (precomputed by :func:`make_pseudo_queries`): it is added to that
position's input and its cosine to every title, times the learned
``query_scale``, to that position's logits (each of its sampled candidates'
under the sampled loss), so the ``has_query=True`` path learns to use the query.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
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


def target_counts(windows: Sequence[np.ndarray], num_items: int) -> np.ndarray:
    """How often each dense index is a training target ``[num_items + 1]`` (each window's
    items after its first: every transition once, as an epoch sees them)."""
    tails = [np.asarray(w[1:], dtype=np.int64) for w in windows]
    flat = np.concatenate(tails) if tails else np.zeros(0, dtype=np.int64)
    return np.bincount(flat, minlength=num_items + 1)[: num_items + 1].astype(np.int64)


class CandidateSampler:
    """The shared negatives of the sampled softmax and their logQ correction.

    ``counts`` ``[num_items + 1]`` are training-target counts by dense index (see
    :func:`target_counts`); they give the in-batch proposal (unigram) and the
    popularity rank of the log-uniform one, ``Q(rank r) = log((r + 2) / (r + 1)) /
    log(n + 1)`` (Zipf-like, as TensorFlow's ``log_uniform_candidate_sampler``).
    Asking for at least as many negatives as there are items takes every item once
    (expected count 1 each), which makes the loss the exact full softmax when there
    are no in-batch negatives.
    """

    def __init__(self, counts: np.ndarray, num_negatives: int, kind: str, in_batch: bool) -> None:
        counts = np.asarray(counts, dtype=np.float64)
        n = len(counts) - 1
        if n < 1:
            raise ValueError("the sampled softmax needs at least one item")
        if in_batch and counts[1:].sum() <= 0:
            raise ValueError("in-batch negatives need training targets")
        self.num_items = n
        self.in_batch = in_batch
        self.every_item = num_negatives >= n
        self.num_negatives = n if self.every_item else num_negatives
        unigram = np.zeros(n + 1)
        if counts[1:].sum() > 0:
            unigram[1:] = counts[1:] / counts[1:].sum()
        proposal = np.zeros(n + 1)
        if kind == "uniform":
            proposal[1:] = 1.0 / n
        elif kind == "log_uniform":
            by_rank = np.argsort(-counts[1:], kind="stable")  # most popular first
            ranks = np.arange(n, dtype=np.float64)
            proposal[1 + by_rank] = np.log((ranks + 2) / (ranks + 1)) / np.log(n + 1)
        else:
            raise ValueError(f"unknown sampler {kind!r}")
        self.unigram = torch.from_numpy(unigram)
        self.proposal = torch.from_numpy(proposal)

    def sample(self) -> Tensor:
        """The batch's shared negatives (dense indices ``[K]``), from torch's global RNG."""
        if self.every_item:
            return torch.arange(1, self.num_items + 1)
        if self.num_negatives == 0:
            return torch.zeros(0, dtype=torch.long)
        return torch.multinomial(self.proposal, self.num_negatives, replacement=True)

    def log_expected_count(self, ids: Tensor, num_rows: int) -> Tensor:
        """``log E[count]`` of items ``ids`` among a batch's shared candidates: the
        ``num_rows`` in-batch targets (if used) and the sampled negatives."""
        sampled = (
            torch.ones(ids.shape, dtype=torch.float64)
            if self.every_item
            else (self.num_negatives * self.proposal[ids])
        )
        expected = sampled + (num_rows * self.unigram[ids] if self.in_batch else 0.0)
        return torch.log(expected).to(torch.float32)


def corrected_softmax_loss(
    positive: Tensor,
    shared: Tensor,
    row_ids: Tensor,
    shared_ids: Tensor,
    log_q_positive: Tensor,
    log_q_shared: Tensor,
) -> Tensor:
    """Mean cross-entropy of each row's positive against shared candidates, logQ-corrected.

    ``positive`` ``[N]`` are the rows' target logits, ``shared`` ``[N, M]`` their logits
    against the shared candidates ``shared_ids`` ``[M]``; ``row_ids`` ``[N]`` are the
    targets' ids and ``log_q_*`` the log expected counts subtracted from the logits. A
    shared candidate equal to its row's target (an accidental hit) is masked out.
    """
    pos = (positive - log_q_positive).unsqueeze(1)
    neg = shared - log_q_shared.unsqueeze(0)
    neg = neg.masked_fill(shared_ids.unsqueeze(0) == row_ids.unsqueeze(1), float("-inf"))
    logits = torch.cat([pos, neg], dim=1)
    labels = torch.zeros(len(logits), dtype=torch.long, device=logits.device)
    return F.cross_entropy(logits, labels)


def _query_batch(
    targets: Tensor, pq: Tensor | None, query_prob: float
) -> tuple[Tensor | None, Tensor | None]:
    """Pseudo-queries ``[B, L, text_dim]`` for a random share of the target positions."""
    if pq is None:
        return None, None
    q_mask = (targets > 0) & (torch.rand(targets.shape) < query_prob)
    picked = targets[q_mask]
    variant = torch.randint(pq.shape[1], picked.shape)
    q_emb = torch.zeros(*targets.shape, pq.shape[2])
    q_emb[q_mask] = pq[picked, variant]
    return q_emb, q_mask


def full_loss(
    model: FineRanker,
    inputs: Tensor,
    targets: Tensor,
    q_emb: Tensor | None,
    q_mask: Tensor | None,
) -> Tensor:
    """Softmax cross-entropy of every target position ``targets > 0`` over every item."""
    is_target = targets > 0
    table = model.all_item_vectors()
    hidden = model._hidden(inputs, q_emb, q_mask, item_table=table)[is_target]
    logits = hidden @ table[1:].T  # every real item; padding is never a class
    labels = targets[is_target] - 1
    if q_emb is not None and q_mask is not None and model.query_scale is not None:
        q_rows = q_mask[is_target]  # target rows that have a query, in the same order
        cos = q_emb[q_mask] @ model.text_emb[1:].T
        logits = torch.cat([logits[~q_rows], logits[q_rows] + model.query_scale * cos])
        labels = torch.cat([labels[~q_rows], labels[q_rows]])
    return F.cross_entropy(logits, labels, label_smoothing=model.cfg.label_smoothing)


def sampled_loss(
    model: FineRanker,
    inputs: Tensor,
    targets: Tensor,
    q_emb: Tensor | None,
    q_mask: Tensor | None,
    sampler: CandidateSampler,
) -> Tensor:
    """The sampling-bias-corrected softmax of every target position (module docstring).

    An item drawn ``c`` times among the shared candidates is one column whose correction
    is ``- log E[count] + log c``: the same loss as ``c`` equal columns, computed once.
    Item vectors are computed only for the ids the batch touches (histories, targets and
    candidates), as one small table the histories are re-indexed into.
    """
    is_target = targets > 0
    labels = targets[is_target]  # [N] dense ids
    drawn = torch.cat([labels, sampler.sample()]) if sampler.in_batch else sampler.sample()
    shared_ids, copies = torch.unique(drawn, return_counts=True)
    # 0 leads the list, so the padding keeps index 0 in the small table (unique sorts)
    touched = torch.cat([torch.zeros(1, dtype=torch.long), inputs.flatten(), labels, shared_ids])
    ids, where = torch.unique(touched, return_inverse=True)
    table = model.item_vectors(ids)
    start = 1 + inputs.numel()
    history = where[1:start].view_as(inputs)
    hidden = model._hidden(history, q_emb, q_mask, item_table=table)[is_target]
    positive = (hidden * table[where[start : start + len(labels)]]).sum(-1)
    shared = hidden @ table[where[start + len(labels) :]].T
    if q_emb is not None and q_mask is not None and model.query_scale is not None:
        q_rows = q_mask[is_target]  # target rows that have a query, in the same order
        queries = q_emb[q_mask]
        text = model.text_emb
        pos_cos = (queries * text[labels[q_rows]]).sum(-1)
        shared_cos = queries @ text[shared_ids].T
        order = torch.cat([torch.nonzero(~q_rows).flatten(), torch.nonzero(q_rows).flatten()])
        positive = torch.cat([positive[~q_rows], positive[q_rows] + model.query_scale * pos_cos])
        shared = torch.cat([shared[~q_rows], shared[q_rows] + model.query_scale * shared_cos])
        labels = labels[order]
    log_q_shared = sampler.log_expected_count(shared_ids, len(labels)) - torch.log(
        copies.to(torch.float32)
    )
    log_q_positive = sampler.log_expected_count(labels, len(labels))
    return corrected_softmax_loss(
        positive, shared, labels, shared_ids, log_q_positive, log_q_shared
    )


VALID_SCORES = 2**24
"""Most scores one validation batch holds (users x items, float32: 64 MiB); at 1M items
a batch of 512 users would hold 2 GiB, several times over while it is ranked."""


def _validate(model: FineRanker, valid_sequences: Sequence[np.ndarray]) -> dict[str, float]:
    hist = [np.asarray(s[:-1]) for s in valid_sequences]
    tgt = np.array([s[-1] if len(s) >= 2 else -1 for s in valid_sequences], dtype=np.int64)
    batch = max(8, min(512, VALID_SCORES // max(model.num_items, 1)))
    return evaluate(lambda h: full_scores(model, h), hist, tgt, ks=(10,), batch_size=batch)


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
    on_epoch: Callable[[dict[str, float]], None] | None = None,
) -> FineRanker:
    """Train a :class:`FineRanker` and return it in eval mode.

    ``sequences`` are catalog rows per user in time order. ``valid_sequences``
    (catalog rows; the last item of each is the validation target, the rest its
    history) enable early stopping on NDCG@10, and the best epoch's weights are
    returned. ``time_budget_s`` stops training before an epoch that would not
    fit. ``pseudo_queries`` ``[num_items + 1, n, text_dim]`` enables search
    training (see :func:`make_pseudo_queries`). ``on_epoch`` gets each epoch's
    numbers (loss, seconds, validation metrics).
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
    sampler = None
    if cfg.loss == "sampled":
        sampler = CandidateSampler(
            target_counts(windows, num_items),
            cfg.num_negatives,
            cfg.sampler,
            cfg.in_batch_negatives,
        )
    use_query = pseudo_queries is not None and cfg.query_prob > 0
    pq = torch.from_numpy(np.asarray(pseudo_queries, dtype=np.float32)) if use_query else None
    best_score, best_hr, best_state, best_epoch, stale = -1.0, -1.0, None, -1, 0
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
            q_emb, q_mask = _query_batch(targets, pq, cfg.query_prob)
            if sampler is None:
                loss = full_loss(model, inputs, targets, q_emb, q_mask)
            else:
                loss = sampled_loss(model, inputs, targets, q_emb, q_mask, sampler)
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
                best_hr = metrics["HR@10"]
                best_state = copy.deepcopy(model.state_dict())
            else:
                stale += 1
        info["epoch_s"] = epoch_times[-1]
        info["val_s"] = time.perf_counter() - t0 - epoch_times[-1]
        log.info("epoch done", extra=info)
        if on_epoch is not None:
            on_epoch(dict(info))
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
        "best_val_hr10": best_hr,
        "seconds": time.perf_counter() - started,
        # the training steps alone (no validation, no set-up), all epochs and up to the best
        "train_seconds": sum(epoch_times),
        "train_seconds_to_best": sum(epoch_times[: max(best_epoch, 0)]),
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
