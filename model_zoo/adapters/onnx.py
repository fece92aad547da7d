"""``entry = "onnx"``: an ONNX file named by ``weights``, run with onnxruntime.

The graph's first input takes the (N, C, ...) float32 tensor, its first output is used. Give
the export dynamic batch and spatial axes, or set ``roi_size`` to the fixed input size.
CUDA is used when onnxruntime has it and a GPU is present, the CPU otherwise.
"""

from __future__ import annotations

import numpy as np
import torch

from model_zoo.adapters.common import AdapterModel


class OnnxModel(AdapterModel):
    def __init__(self, manifest, device="cpu"):
        super().__init__(manifest, device)
        import onnxruntime

        providers = ["CPUExecutionProvider"]
        if self.device.type == "cuda" and "CUDAExecutionProvider" in onnxruntime.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = max(1, torch.get_num_threads())
        self.session = onnxruntime.InferenceSession(str(manifest.folder / manifest.weights),
                                                    sess_options=options, providers=providers)
        self.input_name = self.session.get_inputs()[0].name
        self.device = torch.device("cpu")  # tensors go in and out through numpy

        def predictor(x: torch.Tensor) -> torch.Tensor:
            feed = {self.input_name: np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)}
            return torch.from_numpy(self.session.run(None, feed)[0])

        self.predictor = predictor
