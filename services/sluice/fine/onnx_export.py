"""The fine ranker as ONNX: what stock Triton (the onnxruntime backend) serves.

:class:`ServedRanker` is :meth:`FineRanker.score` on the ranker contract
(:mod:`sluice.fine.contract`): the same inputs, output, shapes and dtypes Triton's
python backend served before, with a variable batch dimension.

The served item table is baked into the graph as a constant: each item's vector (its id
embedding plus its projected title embedding, :meth:`FineRanker.all_item_vectors`) and,
for the query-title term, the titles' MiniLM vectors. The table is a function of the
trained weights and of the build's dense item numbering, so it belongs to the model
version: a version directory is then one immutable, self-contained build, the contract
stays what the fine stage already sends, and a request carries 256 candidate ids instead
of a table. Passing the table as an input would send it with every request, or need a
stateful second model; neither buys anything while a build changes both together.

The graph is opset 18 with IR version 8, which the onnxruntime of every recent NGC
``tritonserver`` (onnxruntime 1.14 or newer) loads. A table over the protobuf limit goes
into ``model.onnx.data`` beside the graph (ONNX external data; both backends read it).

``python -m sluice.fine.onnx_export VERSION_DIR ...`` adds ``model.onnx`` to versions
written before the export existed.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sluice.fine.contract import INPUTS, ONNX_FILE, OUTPUTS
from sluice.fine.model import FineRanker

log = logging.getLogger(__name__)

OPSET = 18
IR_VERSION = 8  # opset 18 needs IR 8; the exporter writes 10, which onnxruntime < 1.18 rejects
EXTERNAL_DATA_BYTES = 1 << 30  # beyond this the weights go to model.onnx.data (limit: 2 GiB)


class ServedRanker(nn.Module):
    """``FineRanker.score`` as one graph, with the served item table as constants."""

    table: Tensor

    def __init__(self, ranker: FineRanker) -> None:
        super().__init__()
        self.ranker = ranker.eval()
        with torch.no_grad():
            self.register_buffer("table", ranker.all_item_vectors().detach().clone())

    def forward(
        self, history: Tensor, candidates: Tensor, query_emb: Tensor, has_query: Tensor
    ) -> Tensor:
        m = self.ranker
        searching = has_query.reshape(-1)
        user = m.encode(history, query_emb, searching, item_table=self.table)
        # [B, C, D] x [B, D, 1]: a batched MatMul (onnxruntime's Einsum took 4x as long)
        items = F.embedding(candidates, self.table)
        scores = torch.matmul(items, user.unsqueeze(-1)).squeeze(-1)
        if m.query_scale is None:
            return scores
        # score() adds the query-title term (FineRanker.query_match) to the rows with a
        # query. Only those rows gather their candidates' 384-d title vectors: that gather
        # was a quarter of a batch's time when every row paid for it (docs/benchmarks.md)
        rows = torch.nonzero(searching).reshape(-1)
        titles = F.embedding(candidates.index_select(0, rows), m.text_emb)
        query = query_emb.index_select(0, rows).to(titles.dtype).unsqueeze(-1)
        match = m.query_scale * torch.matmul(titles, query).squeeze(-1)
        return scores.index_add(0, rows, match)


def example_inputs(ranker: FineRanker, batch: int = 2, seed: int = 0) -> tuple[Tensor, ...]:
    """Contract-shaped inputs over the ranker's items: padded histories and candidates, and
    rows with and without a query."""
    g = torch.Generator().manual_seed(seed)
    (h_len,), (c_len,), (q_dim,), _ = (spec.dims for spec in INPUTS)
    history = torch.randint(1, ranker.num_items + 1, (batch, h_len), generator=g)
    candidates = torch.randint(1, ranker.num_items + 1, (batch, c_len), generator=g)
    history[0, : h_len // 2] = 0
    candidates[-1, c_len // 2 :] = 0
    query = torch.randn(batch, q_dim, generator=g)
    query = query / query.norm(dim=1, keepdim=True)
    has_query = (torch.arange(batch) % 2 == 0).reshape(batch, 1)
    return history, candidates, query, has_query


def export_onnx(ranker: FineRanker, path: Path) -> Path:
    """Write ``ranker`` as an ONNX graph on the ranker contract to ``path``."""
    import onnx

    served = ServedRanker(ranker).eval()
    args = example_inputs(ranker)  # batch 2: the exporter specializes a batch of 1
    batch = torch.export.Dim("batch")
    registry_log = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registry_log.level
    registry_log.setLevel(logging.ERROR)  # "torchvision is not installed": we use none of it
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the exporter's own deprecation chatter
            program = torch.onnx.export(
                served,
                args,
                input_names=[t.name for t in INPUTS],
                output_names=[t.name for t in OUTPUTS],
                dynamic_shapes=tuple({0: batch} for _ in INPUTS),
                opset_version=OPSET,
                dynamo=True,
                verbose=False,
            )
    finally:
        registry_log.setLevel(level)
    assert program is not None
    program.model.ir_version = IR_VERSION
    program.model.producer_name = "sluice"
    weights = sum(
        v.const_value.nbytes
        for v in program.model.graph.initializers.values()
        if v.const_value is not None
    )
    big = weights > EXTERNAL_DATA_BYTES
    path.parent.mkdir(parents=True, exist_ok=True)
    path.with_name(path.name + ".data").unlink(missing_ok=True)
    program.save(path, external_data=big)  # external data: <path>.data
    onnx.checker.check_model(str(path))
    log.info("exported the ranker to onnx", extra={"path": str(path), "external_data": big})
    return path


def save_version(ranker: FineRanker, directory: Path) -> None:
    """A version directory: the torch files (training, in-process scoring) and model.onnx."""
    ranker.save(directory)
    export_onnx(ranker, directory / ONNX_FILE)


def max_abs_diff(ranker: FineRanker, onnx_path: Path, inputs: Sequence[np.ndarray]) -> float:
    """Largest |onnxruntime - torch| score over ``inputs`` (contract order)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    feed = {
        spec.name: np.asarray(x, dtype=spec.numpy_dtype)
        for spec, x in zip(INPUTS, inputs, strict=True)
    }
    (got,) = session.run([OUTPUTS[0].name], feed)
    h, c, q, s = (torch.from_numpy(np.ascontiguousarray(feed[t.name])) for t in INPUTS)
    want = ranker.score(h, c, q, s.reshape(-1)).numpy()
    return float(np.abs(got - want).max())


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description="Add model.onnx to fine_ranker version directories written by an "
        "older `sluice build` (and refresh their python-backend model.py)."
    )
    ap.add_argument("versions", nargs="+", type=Path, help="model_repository/fine_ranker/<n>")
    args = ap.parse_args(argv)
    from sluice.paths import model_templates

    runner = model_templates() / "fine_ranker" / "model.py"
    for directory in args.versions:
        ranker = FineRanker.load(directory)
        path = export_onnx(ranker, directory / ONNX_FILE)
        diff = max_abs_diff(ranker, path, [t.numpy() for t in example_inputs(ranker, batch=4)])
        if runner.is_file():
            with runner.open("rb") as src, (directory / "model.py").open("wb") as dst:
                shutil.copyfileobj(src, dst)
        print(f"{path}: max |onnx - torch| = {diff:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
