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
from typing import Any

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
        # query. Only those rows gather their candidates' 384-d title vectors, which cost
        # every row when computed for the whole batch (docs/benchmarks.md)
        rows = torch.nonzero(searching).reshape(-1)
        match = m.query_match(query_emb.index_select(0, rows), candidates.index_select(0, rows))
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


def _scalar(value: Any) -> float | None:
    """The value of a one-element constant input, else None."""
    const = value.const_value if value is not None else None
    if const is None or const.size != 1:
        return None
    return float(const.numpy().reshape(-1)[0])


def _sole_use(node: Any) -> tuple[Any, int] | None:
    """The one (node, input index) that reads ``node``'s only output, if the output is read
    exactly once and is not a graph output; else None."""
    out = node.outputs[0]
    uses = list(out.uses())
    if len(node.outputs) != 1 or len(uses) != 1 or out.is_graph_output():
        return None
    return uses[0].node, uses[0].idx


def order_gelu_for_fusion(graph: Any) -> int:
    """Reorder each exact GELU so that onnxruntime fuses it; returns how many it reordered.

    The exporter writes ``F.gelu(x)`` as ``x * (0.5 * (erf(x / sqrt 2) + 1))``.
    onnxruntime's GeluFusion knows ``(x * (erf(x / sqrt 2) + 1)) * 0.5`` and leaves this
    order as five separate nodes (a fifth of the ranker's time at batch 16). Swapping the
    two Muls' inputs gives the known order: the same standard-ONNX graph, and the same
    values (a product with 0.5 is exact), which onnxruntime then runs as one BiasGelu
    kernel. Only that exact chain, each link read once, is touched.
    """
    count = 0
    for erf in [n for n in graph if n.op_type == "Erf"]:
        div = erf.inputs[0].producer() if erf.inputs[0] is not None else None
        if div is None or div.op_type != "Div" or len(div.inputs) != 2:
            continue
        x, root = div.inputs[0], _scalar(div.inputs[1])
        if root is None or abs(root - 2.0**0.5) > 1e-6:
            continue
        add_use = _sole_use(erf)
        if add_use is None or add_use[0].op_type != "Add" or len(add_use[0].inputs) != 2:
            continue
        add, erf_at = add_use
        half_use = _sole_use(add)
        if half_use is None or half_use[0].op_type != "Mul" or len(half_use[0].inputs) != 2:
            continue
        half_mul, add_at = half_use
        x_use = _sole_use(half_mul)
        if x_use is None or x_use[0].op_type != "Mul" or len(x_use[0].inputs) != 2:
            continue
        x_mul, half_at = x_use
        one, half = add.inputs[1 - erf_at], half_mul.inputs[1 - add_at]
        if x_mul.inputs[1 - half_at] is not x or _scalar(one) != 1.0 or _scalar(half) != 0.5:
            continue
        # half_mul: 0.5 * (erf + 1)  ->  x * (erf + 1);  x_mul: x * that  ->  that * 0.5
        half_mul.replace_input_with(1 - add_at, x)
        x_mul.replace_input_with(1 - half_at, half)
        count += 1
    return count


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
    fused = order_gelu_for_fusion(program.model.graph)
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
    log.info(
        "exported the ranker to onnx",
        extra={"path": str(path), "external_data": big, "gelu_reordered": fused},
    )
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
