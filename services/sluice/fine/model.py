"""The fine ranker: a SASRec-style causal transformer over the user's history.

Items are dense indices ``catalog row + 1`` (0 = padding). An item's vector is a
learned id embedding plus a learned projection of its frozen MiniLM title
embedding, so rarely seen items still get a meaningful vector. The user vector
is the transformer output at the most recent history position. A candidate's
score is the dot product of the user vector and the item vector, which also
makes full-catalog softmax training cheap.

Search (``has_query=True``): the query (MiniLM, 384-d) is projected and added
to the most recent position's input, so the transformer reads it in the context
of the history, and ``query_scale * cos(query, title)`` is added to the score,
so the exact semantic match is not squeezed through the ``dim``-wide user
vector. The same model serves recommendation (``has_query=False``) and search.

Positions are counted from the user's first (non-padding) history item, so the
amount of left padding never changes a score, and encoding a prefix of a
history gives exactly the output the full history has at that position (what
training on all positions relies on).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.pt"
TEXT_FILE = "text_emb.npy"
LOSSES = ("full", "sampled")
SAMPLERS = ("log_uniform", "uniform")


@dataclass
class RankerConfig:
    """Architecture and training hyper-parameters (all saved with the model)."""

    max_len: int = 50  # history items the encoder reads (the most recent ones)
    dim: int = 64
    heads: int = 2
    layers: int = 2
    dropout: float = 0.3  # dropout on embeddings, attention and feed-forward
    text_dim: int = 384
    use_text: bool = True  # add the projected title embedding to the item vector
    use_ids: bool = True  # learn an id embedding per item
    # training
    lr: float = 3e-3
    weight_decay: float = 0.01
    batch_size: int = 128  # sequences per step
    query_prob: float = 0.1  # share of training positions that get a pseudo-query
    label_smoothing: float = 0.0
    patience: int = 3  # validation checks without improvement before stopping
    eval_every: int = 1  # epochs between validation checks
    num_threads: int = 2
    # the training loss: "full" (softmax over every item) or "sampled" (sampling-bias-
    # corrected softmax over in-batch targets and shared sampled negatives, see train.py)
    loss: str = "full"
    num_negatives: int = 2048  # "sampled": shared negatives drawn per batch
    sampler: str = "log_uniform"  # "sampled": "log_uniform" over popularity rank, or "uniform"
    in_batch_negatives: bool = True  # "sampled": the batch's other targets are negatives too

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {self.sampler!r}")
        if self.num_negatives < 0:
            raise ValueError(f"num_negatives must be 0 or more, got {self.num_negatives}")
        if self.loss == "sampled":
            if self.num_negatives == 0 and not self.in_batch_negatives:
                raise ValueError("the sampled loss needs num_negatives > 0 or in_batch_negatives")
            if self.label_smoothing:
                raise ValueError("label_smoothing applies to the full softmax only")

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> RankerConfig:
        data = json.loads(text)
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def pad_histories(histories: Sequence[np.ndarray], max_len: int) -> Tensor:
    """Left-pad dense-index histories into ``[B, L]`` keeping the ``max_len`` most recent.

    ``L`` is the longest (truncated) history in the batch, at least 1.
    """
    cut = [np.asarray(h, dtype=np.int64)[-max_len:] if max_len > 0 else h for h in histories]
    length = max([len(h) for h in cut] + [1])
    out = np.zeros((len(cut), length), dtype=np.int64)
    for i, h in enumerate(cut):
        if len(h):
            out[i, length - len(h) :] = h
    return torch.from_numpy(out)


class _Block(nn.Module):
    """Pre-LayerNorm transformer block with causal multi-head attention."""

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.heads = heads
        self.ln1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.ln2 = nn.LayerNorm(dim)
        self.ff1 = nn.Linear(dim, 4 * dim)
        self.ff2 = nn.Linear(4 * dim, dim)
        self.drop = nn.Dropout(dropout)
        self.attn_dropout = dropout

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        b, length, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, length, 3, self.heads, d // self.heads).unbind(2)
        att = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            attn_mask=mask,
            dropout_p=self.attn_dropout if self.training else 0.0,
        )
        x = x + self.drop(self.out(att.transpose(1, 2).reshape(b, length, d)))
        out: Tensor = x + self.drop(self.ff2(self.drop(F.gelu(self.ff1(self.ln2(x))))))
        return out


class FineRanker(nn.Module):
    """Scores candidate items for a user history and an optional query."""

    text_emb: Tensor

    def __init__(self, num_items: int, text_emb: np.ndarray | None, cfg: RankerConfig) -> None:
        super().__init__()
        if not (cfg.use_ids or cfg.use_text):
            raise ValueError("the ranker needs ids, text or both")
        if cfg.use_text and text_emb is None:
            raise ValueError("use_text needs a text embedding table")
        self.num_items = num_items
        self.cfg = cfg
        d = cfg.dim
        self.item_emb: nn.Embedding | None = None
        if cfg.use_ids:
            emb = nn.Embedding(num_items + 1, d, padding_idx=0)
            nn.init.normal_(emb.weight, std=d**-0.5)
            with torch.no_grad():
                emb.weight[0].zero_()
            self.item_emb = emb
        if cfg.use_text:
            table = np.asarray(text_emb, dtype=np.float32)
            if table.shape != (num_items + 1, cfg.text_dim):
                raise ValueError(
                    f"text table has shape {table.shape}, expected {(num_items + 1, cfg.text_dim)}"
                )
            # shared with the caller's table (never written; 1.5 GiB at 1M items), unless
            # it is read-only (a memory map)
            if not table.flags.writeable:
                table = table.copy()
            self.register_buffer("text_emb", torch.from_numpy(table), persistent=False)
            self.text_proj: nn.Linear | None = nn.Linear(cfg.text_dim, d)
        else:
            self.register_buffer("text_emb", torch.zeros(0, cfg.text_dim), persistent=False)
            self.text_proj = None
        self.pos_emb = nn.Embedding(cfg.max_len, d)
        nn.init.normal_(self.pos_emb.weight, std=0.02)
        self.query_proj = nn.Linear(cfg.text_dim, d)
        # weight of the direct query-title cosine added to the score when searching
        self.query_scale = nn.Parameter(torch.tensor(10.0)) if cfg.use_text else None
        self.emb_ln = nn.LayerNorm(d)
        self.emb_drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(_Block(d, cfg.heads, cfg.dropout) for _ in range(cfg.layers))
        self.final_ln = nn.LayerNorm(d)
        self.train_info: dict[str, float] = {}  # filled by training, not saved
        self._served_table: Tensor | None = None  # all_item_vectors() while serving

    # -- the item table while serving -----------------------------------------
    def train(self, mode: bool = True) -> FineRanker:
        if mode or self.training:  # weights may change, or just did: recompute when serving
            self._served_table = None
        return super().train(mode)

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> FineRanker:
        self._served_table = None  # .to(device/dtype) makes a computed table stale
        return super()._apply(fn, *args, **kwargs)

    def served_item_table(self) -> Tensor:
        """:meth:`all_item_vectors`, computed once while the model is in eval mode.

        Every request gathers its candidates' and history's vectors from it instead of
        projecting their 384-d text vectors again: per request that saves a gather of
        ``C x 384`` floats and a ``C x 384 x D`` matmul. Recomputed after training or a move.
        """
        if self.training:
            return self.all_item_vectors()
        if self._served_table is None:
            with torch.no_grad():
                self._served_table = self.all_item_vectors()
        return self._served_table

    # -- item side ----------------------------------------------------------
    def item_vectors(self, idx: Tensor) -> Tensor:
        """Vectors ``[..., D]`` of dense item indices; index 0 (padding) gives zeros."""
        out: Tensor | None = None
        if self.item_emb is not None:
            out = self.item_emb(idx)
        if self.text_proj is not None:
            text = self.text_proj(self.text_emb[idx])
            out = text if out is None else out + text
        assert out is not None
        return out * (idx > 0).unsqueeze(-1).to(out.dtype)

    def query_match(self, query_emb: Tensor, idx: Tensor) -> Tensor:
        """``query_scale * cos(query, title)`` for items ``idx`` ``[B, C]`` (zeros without text)."""
        if self.query_scale is None:
            return torch.zeros(idx.shape, dtype=self.pos_emb.weight.dtype, device=idx.device)
        # a gather and a batched MatMul: onnxruntime ran the einsum and the indexing's
        # GatherND at a quarter of the exported ranker's time (docs/benchmarks.md)
        titles = F.embedding(idx, self.text_emb)
        query = query_emb.to(titles.dtype).unsqueeze(-1)
        return self.query_scale * torch.matmul(titles, query).squeeze(-1)

    def all_item_vectors(self) -> Tensor:
        """``[num_items + 1, D]``; row 0 (padding) is zeros."""
        device = self.pos_emb.weight.device
        return self.item_vectors(torch.arange(self.num_items + 1, device=device))

    # -- user side ----------------------------------------------------------
    def _hidden(
        self,
        history: Tensor,
        query_emb: Tensor | None,
        query_mask: Tensor | None,
        item_table: Tensor | None = None,
    ) -> Tensor:
        """Transformer outputs ``[B, L, D]`` for every history position.

        ``query_emb`` is ``[B, L, text_dim]`` (or ``[B, text_dim]`` for the last
        position only) and ``query_mask`` ``[B, L]`` (or ``[B]``) says where a
        query is added to the input.
        """
        length = history.shape[1]
        if length > self.cfg.max_len:
            history = history[:, -self.cfg.max_len :]
            length = self.cfg.max_len
            if query_emb is not None and query_emb.dim() == 3:
                query_emb = query_emb[:, -length:]
                assert query_mask is not None
                query_mask = query_mask[:, -length:]
        valid = history > 0
        if item_table is not None:
            x = F.embedding(history, item_table)
        else:
            x = self.item_vectors(history)
        x = x * math.sqrt(self.cfg.dim)
        # position 0 = the first real item: invariant to left padding
        first = length - valid.sum(1, keepdim=True)
        pos = (torch.arange(length, device=history.device).unsqueeze(0) - first).clamp(min=0)
        x = x + self.pos_emb(pos) * valid.unsqueeze(-1).to(x.dtype)
        if query_emb is not None and query_mask is not None:
            q = self.query_proj(query_emb.to(x.dtype)) * math.sqrt(self.cfg.dim)
            qm = query_mask.to(x.dtype)
            if q.dim() == 2:  # the query joins the most recent position
                add = torch.zeros_like(x)
                add[:, -1] = q * qm.unsqueeze(-1)
                x = x + add
                valid = valid.clone()
                valid[:, -1] |= query_mask  # an empty history with a query still has a token
            else:
                x = x + q * qm.unsqueeze(-1)
        x = self.emb_drop(self.emb_ln(x))
        idx = torch.arange(length, device=history.device)
        causal = idx.unsqueeze(0) <= idx.unsqueeze(1)  # [L, L] query i may see key j <= i
        mask = causal.unsqueeze(0) & valid.unsqueeze(1)
        mask = mask | torch.eye(length, dtype=torch.bool, device=history.device).unsqueeze(0)
        mask = mask.unsqueeze(1)  # [B, 1, L, L]
        for block in self.blocks:
            x = block(x, mask)
        return self.final_ln(x)

    def encode(
        self,
        history: Tensor,
        query_emb: Tensor,
        has_query: Tensor,
        item_table: Tensor | None = None,
    ) -> Tensor:
        """User vectors ``[B, D]`` from histories ``[B, L]`` (left-padded, most recent last).

        Where ``has_query``, the projected query joins the most recent position.
        """
        if history.shape[1] == 0:
            history = torch.zeros(history.shape[0], 1, dtype=torch.long, device=history.device)
        return self._hidden(history, query_emb, has_query, item_table=item_table)[:, -1]

    @torch.no_grad()
    def score(
        self, history: Tensor, candidates: Tensor, query_emb: Tensor, has_query: Tensor
    ) -> Tensor:
        """Scores ``[B, C]`` of candidates ``[B, C]`` (dense indices; 0 = padding, score 0)."""
        was_training = self.training
        if was_training:  # eval() walks every submodule: not on each served request
            self.eval()
        try:
            table = self.served_item_table()
            user = self.encode(history, query_emb, has_query, item_table=table)
            out = torch.einsum("bd,bcd->bc", user, F.embedding(candidates, table))
            if self.query_scale is not None and bool(has_query.any()):
                match = self.query_match(query_emb, candidates)
                out = out + match * has_query.unsqueeze(1).to(out.dtype)
            return out
        finally:
            if was_training:
                self.train(True)

    @torch.no_grad()
    def score_all(self, history: Tensor, query_emb: Tensor, has_query: Tensor) -> Tensor:
        """Scores ``[B, num_items + 1]`` of every item (column 0 = padding)."""
        was_training = self.training
        if was_training:  # eval() walks every submodule: not on each served request
            self.eval()
        try:
            table = self.served_item_table()
            out = self.encode(history, query_emb, has_query, item_table=table) @ table.T
            if self.query_scale is not None and bool(has_query.any()):
                cos = query_emb.to(self.text_emb.dtype) @ self.text_emb.T
                out = out + self.query_scale * cos * has_query.unsqueeze(1).to(out.dtype)
            return out
        finally:
            if was_training:
                self.train(True)

    # -- persistence ----------------------------------------------------------
    def save(self, directory: str | Path) -> None:
        """Write config, weights and the text table into ``directory``."""
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        (path / CONFIG_FILE).write_text(
            json.dumps({"num_items": self.num_items, "config": json.loads(self.cfg.to_json())})
        )
        torch.save(self.state_dict(), path / WEIGHTS_FILE)
        if self.cfg.use_text:
            np.save(path / TEXT_FILE, self.text_emb.cpu().numpy())

    @classmethod
    def load(cls, directory: str | Path, map_location: str | torch.device = "cpu") -> FineRanker:
        """Load a ranker written by :meth:`save`, in eval mode."""
        path = Path(directory)
        meta = json.loads((path / CONFIG_FILE).read_text())
        cfg = RankerConfig.from_json(json.dumps(meta["config"]))
        text = np.load(path / TEXT_FILE) if cfg.use_text else None
        model = cls(int(meta["num_items"]), text, cfg)
        state = torch.load(path / WEIGHTS_FILE, map_location="cpu", weights_only=True)
        if model.query_scale is not None and "query_scale" not in state:
            state["query_scale"] = torch.tensor(0.0)  # saved before the query-title term existed
        model.load_state_dict(state)
        return model.to(map_location).eval()
