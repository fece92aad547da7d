"""Bring-your-own-model adapters: a site registers a model with a model.toml and a file, no code.

``[model] entry`` names the adapter instead of ``module:Class``:

* ``entry = "torchscript"``, ``weights = "model.pt"`` (``torch.jit.save`` output);
* ``entry = "onnx"``, ``weights = "model.onnx"`` (run with onnxruntime);
* ``entry = "monai_bundle"``, ``weights = "my_bundle"`` (a MONAI bundle folder with
  ``configs/inference.json`` (or .yaml) defining ``network_def``, and ``models/model.pt`` or
  ``models/model.ts``).

Pre- and post-processing come from ``[model.options]``; see :mod:`model_zoo.adapters.common`.
"""

from __future__ import annotations

ADAPTERS = {
    "torchscript": "model_zoo.adapters.torchscript:TorchScriptModel",
    "onnx": "model_zoo.adapters.onnx:OnnxModel",
    "monai_bundle": "model_zoo.adapters.monai_bundle:MonaiBundleModel",
}


def adapter_class(entry: str):
    """The adapter class for an ``entry`` value, or None when entry is 'module:Class'."""
    target = ADAPTERS.get(entry)
    if target is None:
        return None
    import importlib

    module_name, _, class_name = target.partition(":")
    return getattr(importlib.import_module(module_name), class_name)
