"""``entry = "monai_bundle"``: a MONAI bundle folder named by ``weights``.

The bundle's ``configs/inference.json`` (or ``.yaml``) must define ``network_def``; the weights
are ``models/model.pt`` (a state dict, or a checkpoint dict with a ``model`` key) loaded into
it, or else ``models/model.ts`` (TorchScript). Pre/post-processing come from the manifest's
[model.options], not from the bundle's transforms (a bundle's data pipeline reads files;
the node hands over a volume already in memory).

A bundle config can hold Python expressions ("$..."): installing a bundle means trusting it
like code.
"""

from __future__ import annotations

from pathlib import Path

import torch

from model_zoo.adapters.common import AdapterModel
from model_zoo.manifest import ManifestError


def bundle_config(folder: Path) -> Path:
    for name in ("inference.json", "inference.yaml", "inference.yml"):
        if (folder / "configs" / name).is_file():
            return folder / "configs" / name
    raise ManifestError(f"{folder}: not a MONAI bundle: configs/inference.json (or .yaml) not found")


class MonaiBundleModel(AdapterModel):
    def __init__(self, manifest, device="cpu"):
        super().__init__(manifest, device)
        from monai.bundle import ConfigParser

        folder = manifest.folder / manifest.weights
        parser = ConfigParser()
        parser.read_config(str(bundle_config(folder)))
        parser["bundle_root"] = str(folder)
        weights, scripted = folder / "models" / "model.pt", folder / "models" / "model.ts"
        if weights.is_file():
            if "network_def" not in parser:
                raise ManifestError(f"{folder}: the bundle's inference config defines no network_def")
            network = parser.get_parsed_content("network_def", instantiate=True)
            state = torch.load(weights, map_location="cpu", weights_only=True)
            if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
                state = state["model"]
            network.load_state_dict(state)
        elif scripted.is_file():
            network = torch.jit.load(str(scripted), map_location="cpu")
        else:
            raise ManifestError(f"{folder}: the bundle has neither models/model.pt nor models/model.ts")
        self.predictor = network.to(self.device).eval()
