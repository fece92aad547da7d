"""Finding installed models, loading them once, and checking that a series fits a model.

A model is a folder holding a ``model.toml`` (see :mod:`model_zoo.manifest`). Bundled models
live directly under ``model_zoo/``; a site adds its own through extra directories (the
``[models] paths`` of the node configuration), each of which is searched the same way: the
directory itself and its immediate sub-folders.
"""

from __future__ import annotations

import importlib.util
import math
import sys
import threading
from pathlib import Path
from typing import Iterable

from model_zoo.base import Model
from model_zoo.manifest import Manifest, ManifestError, load_manifest

BUNDLED_DIR = Path(__file__).resolve().parent

_cache: dict[tuple[str, str], Model] = {}
_lock = threading.Lock()


def find_manifests(extra_dirs: Iterable[str | Path] = (), include_bundled: bool = True) -> dict[str, Manifest]:
    """Every installed model by name. Raises ManifestError for an invalid model.toml or when two
    folders declare the same model name (a site must not shadow a model silently)."""
    folders = ([BUNDLED_DIR] if include_bundled else []) + [Path(d) for d in extra_dirs]
    found: dict[str, Manifest] = {}
    for folder in folders:
        candidates = [folder / "model.toml"] + sorted(folder.glob("*/model.toml"))
        for path in candidates:
            if not path.is_file():
                continue
            manifest = load_manifest(path)
            if manifest.name in found and found[manifest.name].path != manifest.path:
                raise ManifestError(f"{manifest.path}: model.name: {manifest.name!r} is already "
                                    f"installed from {found[manifest.name].path}")
            found[manifest.name] = manifest
    return found


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _import_entry(manifest: Manifest):
    """The class named by ``entry``: an adapter (torchscript, onnx, monai_bundle; see
    model_zoo.adapters) or "module:Class", imported from the model's folder by path."""
    from model_zoo.adapters import ADAPTERS, adapter_class

    adapter = adapter_class(manifest.entry)
    if adapter is not None:
        if not manifest.weights:
            raise ManifestError(f"{manifest.path}: model.weights: entry {manifest.entry!r} needs the "
                                f"model file (or bundle folder) named in weights")
        return adapter
    module_name, sep, class_name = manifest.entry.partition(":")
    if not sep or not module_name or not class_name:
        raise ManifestError(f"{manifest.path}: model.entry: must be 'module:Class' or one of "
                            f"{', '.join(ADAPTERS)}, got {manifest.entry!r}")
    file = manifest.folder / (module_name.replace(".", "/") + ".py")
    if not file.is_file():
        raise ManifestError(f"{manifest.path}: model.entry: module file not found: {file}")
    unique = f"model_zoo._loaded.{manifest.name}_{manifest.version}_{module_name}".replace("-", "_").replace(".", "_")
    spec = importlib.util.spec_from_file_location(unique, file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[unique] = module  # dataclasses and pickling look the module up by name
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(unique, None)
        raise
    try:
        return getattr(module, class_name)
    except AttributeError:
        raise ManifestError(f"{manifest.path}: model.entry: {file.name} has no {class_name!r}") from None


def load_model(manifest: Manifest, device: str | None = None) -> Model:
    """The model instance for this manifest, created on first use and reused afterwards.

    One instance per (name, version), shared by all threads; the lock makes sure concurrent
    first calls construct it only once. Weight files are checked before importing code.
    """
    key = (manifest.name, manifest.version)
    with _lock:
        model = _cache.get(key)
        if model is None:
            if manifest.weights and not (manifest.folder / manifest.weights).exists():
                raise ManifestError(f"{manifest.path}: model.weights: file not found: "
                                    f"{manifest.folder / manifest.weights}")
            cls = _import_entry(manifest)
            model = cls(manifest, device or default_device())
            _cache[key] = model
        return model


def clear_cache() -> None:
    """Forget loaded models (tests; a reload after installing a new version)."""
    with _lock:
        _cache.clear()


def check_input(manifest: Manifest, attributes: dict, slice_count: int,
                spacing: tuple[float, float, float] | None, present: Iterable[str] = ()) -> list[str]:
    """Why a series does not fit the manifest's [input], as sentences for the job log; [] when it fits.

    ``attributes`` are series-level header values by keyword (Modality, BodyPartExamined, ...)
    that every file shares; ``present``: keywords every file has a value for, shared or not
    (a required attribute may differ per file, e.g. RescaleIntercept).
    """
    spec = manifest.input
    reasons = []
    modality = str(attributes.get("Modality") or "").upper()
    allowed = [m.upper() for m in spec.modality]
    if modality not in allowed:
        reasons.append(f"modality {modality or '(missing)'} is not accepted by {manifest.name} "
                       f"(accepts {', '.join(allowed)})")
    if slice_count < spec.min_slices:
        reasons.append(f"{slice_count} slices; {manifest.name} needs at least {spec.min_slices}")
    low, high = spec.spacing_mm
    # spacing is (between slices, rows, columns); slice_spacing_mm, when set, replaces spacing_mm for the first
    slice_low, slice_high = spec.slice_spacing_mm or spec.spacing_mm
    if spacing is None:
        reasons.append("the voxel spacing is unknown (no consistent slice geometry)")
    else:
        ranges = [(slice_low, slice_high)] + [(low, high)] * (len(spacing) - 1)
        bad = [s for s, (lo, hi) in zip(spacing, ranges)
               if not (isinstance(s, (int, float)) and math.isfinite(s) and lo <= s <= hi)]
        if bad:
            shown = " x ".join(f"{s:g}" for s in spacing)
            allowed = (f"{low:g}..{high:g} mm" if (slice_low, slice_high) == (low, high) else
                       f"{slice_low:g}..{slice_high:g} mm between slices and {low:g}..{high:g} mm in-plane")
            reasons.append(f"voxel spacing {shown} mm is outside {allowed}")
    body_part = str(attributes.get("BodyPartExamined") or "").strip().upper()
    if spec.body_part and body_part and body_part not in spec.body_part:
        reasons.append(f"body part {body_part} is not one of {', '.join(spec.body_part)}")
    present = set(present)
    for keyword in spec.required_attributes:
        value = attributes.get(keyword)
        if keyword in present:
            continue
        if value is None or (isinstance(value, str) and not value.strip()):
            reasons.append(f"required attribute {keyword} is missing")
    return reasons
