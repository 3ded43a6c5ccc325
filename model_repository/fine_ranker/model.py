"""Triton python-backend entry point for the fine ranker.

`sluice build` copies this file into every version directory next to the
trained weights. It stays thin: it loads `sluice.fine.triton_model.TritonRanker`
from the installed package and converts tensors; the model is tested without
Triton.
"""

import json
from pathlib import Path

import triton_python_backend_utils as pb_utils

from sluice.fine.triton_model import TritonRanker

INPUTS = ("HISTORY", "CANDIDATES", "QUERY_EMB", "HAS_QUERY")


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        threads = config.get("parameters", {}).get("torch_threads", {}).get("string_value")
        if threads:
            import torch

            torch.set_num_threads(int(threads))
        device = "cpu"
        if args.get("model_instance_kind") == "GPU":
            device = f"cuda:{args['model_instance_device_id']}"
        version_dir = Path(args["model_repository"]) / args["model_version"]
        self.ranker = TritonRanker(version_dir, device=device)

    def execute(self, requests):
        columns = {
            name: [pb_utils.get_input_tensor_by_name(r, name).as_numpy() for r in requests]
            for name in INPUTS
        }
        scores = self.ranker.score_batch(*(columns[name] for name in INPUTS))
        return [
            pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("SCORES", s)])
            for s in scores
        ]
