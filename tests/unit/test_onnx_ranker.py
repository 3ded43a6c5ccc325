"""The ONNX ranker that `sluice build` writes scores as the torch ranker does, and every
Triton config of the model repository declares what the ONNX graph takes and returns."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from sluice.artifacts import Artifacts
from sluice.core.errors import Unavailable
from sluice.domain import Budget, Candidates, RankContext
from sluice.fine import contract
from sluice.fine.backend import OnnxBackend, RankerContractError, TorchBackend
from sluice.fine.engine import FineEngine
from sluice.fine.model import FineRanker
from sluice.fine.onnx_export import order_gelu_for_fusion

ROOT = Path(__file__).resolve().parents[2]
TEMPLATE = ROOT / "model_repository" / "fine_ranker"
CONFIGS = sorted([TEMPLATE / "config.pbtxt", *(TEMPLATE / "configs").glob("*.pbtxt")])

TRITON_TO_ONNX = {
    mc.TYPE_INT64: onnx.TensorProto.INT64,
    mc.TYPE_FP32: onnx.TensorProto.FLOAT,
    mc.TYPE_BOOL: onnx.TensorProto.BOOL,
}


@pytest.fixture(scope="module")
def onnx_path(tiny_artifacts: Artifacts) -> Path:
    path = tiny_artifacts.ranker_dir / contract.ONNX_FILE
    assert path.is_file(), "sluice build wrote no model.onnx"
    return path


@pytest.fixture(scope="module")
def session(onnx_path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def ranker(tiny_artifacts: Artifacts) -> FineRanker:
    return FineRanker.load(tiny_artifacts.ranker_dir)


def served_tensors(artifacts: Artifacts) -> list[tuple[np.ndarray, ...]]:
    """What the fine stage sends: real users' histories, real candidates (more than one row,
    so the last row is padded), with the query of a real title and without one."""
    catalog = artifacts.catalog
    ids, histories = artifacts.users()
    longest = max(range(len(ids)), key=lambda i: len(histories[i]))
    engine = FineEngine(catalog, TorchBackend(artifacts.ranker_dir))
    text = np.load(artifacts.root / "text_vectors.npy")
    rng = np.random.default_rng(7)
    batches = []
    for user, n_cands, query_row in ((longest, 300, None), (0, 40, 5), (longest, 256, 11)):
        cands = rng.choice(catalog.item_ids, size=n_cands, replace=False)
        ctx = RankContext(
            history_item_ids=histories[user],
            query_embedding=None if query_row is None else text[query_row],
        )
        batches.append(engine.tensors(ctx, Candidates(cands, cands * 0.0, cands * 0)))
    return batches


def run_onnx(session: ort.InferenceSession, tensors: tuple[np.ndarray, ...]) -> np.ndarray:
    feed = {spec.name: t for spec, t in zip(contract.INPUTS, tensors, strict=True)}
    (scores,) = session.run(["SCORES"], feed)
    return np.asarray(scores)


def run_torch(ranker: FineRanker, tensors: tuple[np.ndarray, ...]) -> np.ndarray:
    h, c, q, s = (torch.from_numpy(t) for t in tensors)
    return ranker.score(h, c, q, s.reshape(-1)).numpy()


def test_onnx_scores_equal_torch_on_served_tensors(
    tiny_artifacts: Artifacts, session: ort.InferenceSession, ranker: FineRanker
) -> None:
    batches = served_tensors(tiny_artifacts)
    # one request alone, and all of them as one dynamic batch (mixed query / no query)
    merged = tuple(np.concatenate(parts) for parts in zip(*batches, strict=True))
    for tensors in [*batches, merged]:
        got, want = run_onnx(session, tensors), run_torch(ranker, tensors)
        assert got.shape == want.shape == (len(tensors[0]), contract.CANDIDATES_PER_ROW)
        assert np.abs(got - want).max() <= 1e-4
    # the batch covered what it should: padded candidates, padded history, both kinds of row
    history, candidates, _, has_query = merged
    assert (candidates == 0).any() and (candidates > 0).any()
    assert (history == 0).any()
    assert has_query.any() and not has_query.all()


def test_a_query_changes_the_onnx_scores(
    tiny_artifacts: Artifacts, session: ort.InferenceSession
) -> None:
    """The query inputs reach the graph: the same row with and without its query differs."""
    history, candidates, query, has_query = served_tensors(tiny_artifacts)[1]
    assert has_query.all()
    with_query = run_onnx(session, (history, candidates, query, has_query))
    without = run_onnx(session, (history, candidates, query, np.zeros_like(has_query)))
    real = candidates > 0
    assert np.abs(with_query - without)[real].max() > 1e-3


def test_the_onnx_backend_ranks_as_the_torch_backend_in_the_fine_stage(
    tiny_artifacts: Artifacts,
) -> None:
    """SLUICE_FINE_BACKEND=onnx: the build's model.onnx in the stage's own process gives the
    torch ranker's scores (to 1e-4) and the same pages, with and without a query."""
    backend, torch_backend = (
        OnnxBackend(tiny_artifacts.ranker_dir),
        TorchBackend(tiny_artifacts.ranker_dir),
    )
    assert (backend.model_name, backend.version) == ("fine_ranker", tiny_artifacts.ranker_version)
    for tensors in served_tensors(tiny_artifacts):
        got = backend.score(*tensors)
        want = torch_backend.score(*tensors)
        assert got.dtype == np.float32 and np.abs(got - want).max() <= 1e-4
    catalog = tiny_artifacts.catalog
    _, histories = tiny_artifacts.users()
    onnx_stage = FineEngine(catalog, backend)
    torch_stage = FineEngine(catalog, torch_backend)
    text = np.load(tiny_artifacts.root / "text_vectors.npy")
    rng = np.random.default_rng(3)
    for user, query_row in ((0, None), (1, 4), (2, None)):
        cands = rng.choice(catalog.item_ids, size=300, replace=False)
        ctx = RankContext(
            history_item_ids=histories[user],
            query_embedding=None if query_row is None else text[query_row],
        )
        found = Candidates(cands, rng.random(300).astype(np.float32), cands * 0)
        a = onnx_stage.rank(ctx, found, Budget(50))
        b = torch_stage.rank(ctx, found, Budget(50))
        assert len(a) == 50
        # identical up to float noise: the same items, each scored within 1e-4
        np.testing.assert_allclose(a.scores, b.scores, atol=1e-4)
        assert len(np.intersect1d(a.item_ids[:40], b.item_ids)) == 40


def test_the_onnx_backend_refuses_a_model_without_the_contract(
    tiny_artifacts: Artifacts, tmp_path: Path
) -> None:
    """A folder without model.onnx, or an ONNX graph that is not a ranker (the build's query
    encoder), keeps the stage down with the reason, as a Triton model without it does."""
    with pytest.raises(Unavailable, match=r"has no model\.onnx"):
        OnnxBackend(tmp_path)
    (tmp_path / contract.ONNX_FILE).symlink_to(tiny_artifacts.root / "text_encoder.onnx")
    with pytest.raises(RankerContractError, match="input HISTORY is missing"):
        OnnxBackend(tmp_path)


def test_onnxruntime_fuses_every_gelu(onnx_path: Path, tmp_path: Path) -> None:
    """The exported graph is plain ONNX, and onnxruntime runs each block's exact GELU as one
    fused kernel: with the exporter's own node order it left five nodes per GELU."""
    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    assert {node.domain for node in graph.node} <= {"", "ai.onnx"}
    erfs = sum(node.op_type == "Erf" for node in graph.node)
    assert erfs >= 1
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    optimized = onnx.load(options.optimized_model_filepath, load_external_data=False).graph
    kinds = [node.op_type for node in optimized.node]
    assert "Erf" not in kinds
    assert kinds.count("BiasGelu") + kinds.count("Gelu") == erfs


def gelu_chain(
    tag: str, x: str, divisor: float
) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """``x * (0.5 * (erf(x / divisor) + 1))`` in the exporter's order, output ``tag``."""
    h = onnx.helper
    consts = [
        h.make_tensor(f"{tag}_div", onnx.TensorProto.FLOAT, [], [divisor]),
        h.make_tensor(f"{tag}_one", onnx.TensorProto.FLOAT, [], [1.0]),
        h.make_tensor(f"{tag}_half", onnx.TensorProto.FLOAT, [], [0.5]),
    ]
    nodes = [
        h.make_node("Div", [x, f"{tag}_div"], [f"{tag}_d"]),
        h.make_node("Erf", [f"{tag}_d"], [f"{tag}_e"]),
        h.make_node("Add", [f"{tag}_e", f"{tag}_one"], [f"{tag}_a"]),
        h.make_node("Mul", [f"{tag}_half", f"{tag}_a"], [f"{tag}_h"]),
        h.make_node("Mul", [x, f"{tag}_h"], [tag]),
    ]
    return nodes, consts


def test_order_gelu_for_fusion_reorders_only_an_exact_gelu() -> None:
    """A GELU chain is reordered with bit-identical outputs; the same chain dividing by 2
    (not a GELU) is left as it was."""
    import onnx_ir as ir

    h = onnx.helper
    gelu, gelu_consts = gelu_chain("gelu", "X", 2.0**0.5)
    other, other_consts = gelu_chain("other", "X", 2.0)
    graph = h.make_graph(
        [*gelu, *other],
        "g",
        [h.make_tensor_value_info("X", onnx.TensorProto.FLOAT, [4, 16])],
        [
            h.make_tensor_value_info(name, onnx.TensorProto.FLOAT, [4, 16])
            for name in ("gelu", "other")
        ],
        initializer=[*gelu_consts, *other_consts],
    )
    original = h.make_model(graph, opset_imports=[h.make_opsetid("", 18)])
    model = ir.from_proto(original)
    assert order_gelu_for_fusion(model.graph) == 1
    rewritten = ir.to_proto(model)
    onnx.checker.check_model(rewritten)
    mul_inputs = {n.output[0]: list(n.input) for n in rewritten.graph.node if n.op_type == "Mul"}
    # x * (erf + 1) first, then the product with 0.5 (either operand order)
    assert mul_inputs["gelu_h"] == ["X", "gelu_a"]
    assert sorted(mul_inputs["gelu"]) == ["gelu_h", "gelu_half"]
    assert mul_inputs["other_h"] == ["other_half", "other_a"]
    assert mul_inputs["other"] == ["X", "other_h"]
    x = {"X": np.random.default_rng(3).normal(0, 3, (4, 16)).astype(np.float32)}
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    runs = [
        ort.InferenceSession(
            m.SerializeToString(), options, providers=["CPUExecutionProvider"]
        ).run(None, x)
        for m in (original, rewritten)
    ]
    for before, after in zip(*runs, strict=True):
        assert np.array_equal(before, after)
    assert np.allclose(
        runs[1][0], torch.nn.functional.gelu(torch.from_numpy(x["X"])).numpy(), atol=1e-6
    )


def test_the_onnx_graph_declares_the_contract(onnx_path: Path) -> None:
    model = onnx.load(str(onnx_path), load_external_data=False)
    onnx.checker.check_model(model)
    assert model.ir_version <= 8  # loads in the onnxruntime of older Triton releases too
    assert {o.domain: o.version for o in model.opset_import}[""] <= 18
    for declared, specs in (
        (model.graph.input, contract.INPUTS),
        (model.graph.output, contract.OUTPUTS),
    ):
        assert [v.name for v in declared] == [s.name for s in specs]
        for value, spec in zip(declared, specs, strict=True):
            dims = value.type.tensor_type.shape.dim
            assert dims[0].dim_param and not dims[0].dim_value, f"{spec.name}: batch not dynamic"
            assert tuple(d.dim_value for d in dims[1:]) == spec.dims
            np_type = onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type)
            assert np_type == spec.numpy_dtype


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_matches_the_onnx_graph(path: Path, onnx_path: Path) -> None:
    config = text_format.Parse(path.read_text(), mc.ModelConfig())
    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    assert config.name == "fine_ranker"
    assert config.max_batch_size > 0, "the graph's first dimension is the batch"
    for declared, values in ((config.input, graph.input), (config.output, graph.output)):
        assert [t.name for t in declared] == [v.name for v in values]
        for tensor, value in zip(declared, values, strict=True):
            assert TRITON_TO_ONNX[tensor.data_type] == value.type.tensor_type.elem_type
            graph_dims = [d.dim_value for d in value.type.tensor_type.shape.dim[1:]]
            assert list(tensor.dims) == graph_dims, tensor.name
    # two versions loaded at once: a rollout serves the new build while the old one drains
    assert config.version_policy.WhichOneof("policy_choice") == "latest"
    assert config.version_policy.latest.num_versions == 2
    assert config.HasField("dynamic_batching")


def test_the_configs_run_where_they_say() -> None:
    configs = {p.stem: text_format.Parse(p.read_text(), mc.ModelConfig()) for p in CONFIGS}
    kind = {name: {g.kind for g in c.instance_group} for name, c in configs.items()}
    cpu, gpu = mc.ModelInstanceGroup.KIND_CPU, mc.ModelInstanceGroup.KIND_GPU
    assert configs["config"].backend == "onnxruntime" and kind["config"] == {cpu}
    assert configs["gpu"].backend == "onnxruntime" and kind["gpu"] == {gpu}
    trt = configs["gpu-tensorrt"]
    assert trt.backend == "onnxruntime" and kind["gpu-tensorrt"] == {gpu}
    accelerators = trt.optimization.execution_accelerators.gpu_execution_accelerator
    assert [a.name for a in accelerators] == ["tensorrt"]
    assert configs["local"].backend == "python" and kind["local"] == {cpu}
    # the python-backend runner reads the onnxruntime backend's thread settings
    assert dict(configs["local"].parameters).keys() == dict(configs["config"].parameters).keys()


def test_the_python_backend_runner_stays_thin() -> None:
    """model.py (configs/local.pbtxt) needs numpy and onnxruntime only: no sluice, no torch."""
    tree = ast.parse((TEMPLATE / "model.py").read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert imported == {"json", "pathlib", "numpy", "onnxruntime", "triton_python_backend_utils"}


# -- the contract check the fine stage runs at warm-up ---------------------------------------
def metadata(**changes: dict[str, object]) -> dict[str, list[dict[str, object]]]:
    """Triton model metadata (as JSON) declaring the contract, with some tensors changed."""

    def entry(spec: contract.TensorSpec) -> dict[str, object]:
        base = {"name": spec.name, "datatype": spec.datatype, "shape": ["-1", *map(str, spec.dims)]}
        return {**base, **changes.get(spec.name, {})}

    return {
        "inputs": [entry(s) for s in contract.INPUTS],
        "outputs": [entry(s) for s in contract.OUTPUTS],
    }


def test_the_contract_accepts_what_the_build_exports() -> None:
    assert contract.check_metadata(metadata()) == []
    # a model may leave a non-batch dimension variable
    assert contract.check_metadata(metadata(HISTORY={"shape": ["-1", "-1"]})) == []


@pytest.mark.parametrize(
    ("changes", "problem"),
    [
        ({"SCORES": {"name": "LOGITS"}}, "output SCORES is missing"),
        ({"QUERY_EMB": {"datatype": "FP16"}}, "input QUERY_EMB is FP16, not FP32"),
        ({"CANDIDATES": {"shape": ["-1", "128"]}}, "input CANDIDATES has shape [-1, 128]"),
        ({"HAS_QUERY": {"shape": ["1"]}}, "input HAS_QUERY has shape [1]"),
        ({"HISTORY": {"name": "USER_ITEMS"}}, "input USER_ITEMS is not part of the contract"),
    ],
)
def test_the_contract_names_what_is_wrong(
    changes: dict[str, dict[str, object]], problem: str
) -> None:
    problems = contract.check_metadata(metadata(**changes))
    assert any(p.startswith(problem) for p in problems), problems


def test_the_local_config_is_chosen_without_an_onnxruntime_backend(tmp_path: Path) -> None:
    from sluice.tools.triton_setup import backend_dir

    (tmp_path / "python").mkdir()
    (tmp_path / "python" / "libtriton_python.so").touch()
    assert contract.model_config_name(tmp_path, gpu=False) == "local"
    with pytest.raises(ValueError, match="onnxruntime backend"):
        contract.model_config_name(tmp_path, gpu=True)  # said plainly, not by Triton's log
    (tmp_path / "onnxruntime").mkdir()
    (tmp_path / "onnxruntime" / "libtriton_onnxruntime.so").touch()
    assert contract.model_config_name(tmp_path, gpu=False) is None
    assert contract.model_config_name(tmp_path, gpu=True) == "gpu"
    # the nvidia-pytriton tritonserver of this environment has the python backend only
    assert contract.model_config_name(backend_dir(), gpu=False) == "local"
