"""``entry = "torchscript"``: a ``torch.jit.save`` file named by ``weights``."""

from __future__ import annotations

import torch

from model_zoo.adapters.common import AdapterModel


class TorchScriptModel(AdapterModel):
    def __init__(self, manifest, device="cpu"):
        super().__init__(manifest, device)
        module = torch.jit.load(str(manifest.folder / manifest.weights), map_location=self.device)
        module.eval()
        self.predictor = module
