"""Triton python backend: runs this version's ``model.onnx`` with onnxruntime.

Only for ``configs/local.pbtxt``, on a ``tritonserver`` without the onnxruntime backend
(the one in the nvidia-pytriton wheel). Stock Triton serves the same file with its
onnxruntime backend (``config.pbtxt``, ``configs/gpu.pbtxt``) and never runs this.

`sluice build` copies this file into every version directory. It knows no model: the
tensors it feeds and returns are the ones the model config declares, so the same file
serves any ONNX model on the ranker contract. A dynamic batch's requests are concatenated
into one ``session.run`` and the outputs split back per request. Needs numpy and
onnxruntime only.
"""

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils

ONNX_FILE = "model.onnx"


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.inputs = [t["name"] for t in config["input"]]
        self.outputs = [t["name"] for t in config["output"]]
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        options = ort.SessionOptions()
        # the onnxruntime backend's parameter names, so one config's values mean the same
        options.intra_op_num_threads = int(params.get("intra_op_thread_count") or 0)
        options.inter_op_num_threads = int(params.get("inter_op_thread_count") or 0)
        path = Path(args["model_repository"]) / args["model_version"] / ONNX_FILE
        self.session = ort.InferenceSession(
            str(path), sess_options=options, providers=["CPUExecutionProvider"]
        )

    def execute(self, requests):
        columns = {
            name: [pb_utils.get_input_tensor_by_name(r, name).as_numpy() for r in requests]
            for name in self.inputs
        }
        sizes = [len(a) for a in columns[self.inputs[0]]]
        feed = {name: np.concatenate(arrays) for name, arrays in columns.items()}
        results = self.session.run(self.outputs, feed)
        bounds = np.cumsum(sizes)[:-1]
        parts = [np.split(r, bounds) for r in results]
        return [
            pb_utils.InferenceResponse(
                output_tensors=[
                    pb_utils.Tensor(name, np.ascontiguousarray(part[i]))
                    for name, part in zip(self.outputs, parts)
                ]
            )
            for i in range(len(requests))
        ]
