"""Metrics for MODEL_CARD.md, on real CT never used for training.

    .venv/bin/python -m model_zoo.lung_ct_seg.evaluate [--data ../shared/data] [--speed]

1. TotalSegmentator example_ct.nii.gz (abdomen + lung bases, 3 mm) against TotalSegmentator's
   own lung lobe labels (example_seg_fast_force_split.nii.gz, labels 10-14 merged): Dice,
   volume error, and the measurements taken on our mask vs on the reference mask.
2. JoHof/lungmask test slice (LIDC-IDRI chest CT, one 512x512 slice): lung area of our mask vs
   the area lungmask's R231 model produces on it (64752 + 36536 pixels over its two identical
   slices, asserted in lungmask's tests/test_mask.py). Area only: no mask is published.
   The slice is stacked 24 times at 1 mm to make a volume, which is unlike any real scan.
3. --speed: wall time of predict() on a synthetic 400 x 512 x 512 CT at 0.7 x 0.7 x 1 mm.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from model_zoo.lung_ct_seg.data import DEFAULT_DATA, load_eval_case, volume_from_array
from model_zoo.registry import find_manifests, load_model

LUNGMASK_SLICE = Path("ct_volumes/JoHof__lungmask/tests/testdata/0.dcm")
LUNGMASK_R231_PIXELS_PER_SLICE = (64752 + 36536) / 2


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = a.sum() + b.sum()
    return float(2 * np.logical_and(a, b).sum() / total) if total else 1.0


def measure(mask, pixels, voxel_ml):
    values = pixels[mask]
    return {"volume_ml": mask.sum() * voxel_ml, "mean_hu": float(values.mean()),
            "laa950_pct": float(100 * (values < -950).mean())}


def evaluate_totalsegmentator(model, data: Path) -> dict:
    pixels, spacing, reference = load_eval_case(data)
    volume = volume_from_array(pixels, spacing)
    started = time.time()
    output = model.predict(volume)
    seconds = time.time() - started
    mask = output.segments[0].mask
    ours, ref = measure(mask, pixels, volume.voxel_volume_ml), measure(reference, pixels, volume.voxel_volume_ml)
    return {
        "case": "TotalSegmentator example_ct (3 mm, 112 slices)",
        "dice": dice(mask, reference),
        "volume_ml": ours["volume_ml"], "reference_volume_ml": ref["volume_ml"],
        "volume_error_pct": 100 * (ours["volume_ml"] - ref["volume_ml"]) / ref["volume_ml"],
        "mean_hu": ours["mean_hu"], "reference_mean_hu": ref["mean_hu"],
        "laa950_pct": ours["laa950_pct"], "reference_laa950_pct": ref["laa950_pct"],
        "false_positive_ml_outside_reference_slices":
            mask[~reference.any(axis=(1, 2))].sum() * volume.voxel_volume_ml,
        "seconds": seconds,
    }


def evaluate_lungmask_slice(model, data: Path) -> dict:
    import pydicom

    ds = pydicom.dcmread(data / LUNGMASK_SLICE)
    hu = ds.pixel_array.astype(np.float32) * float(getattr(ds, "RescaleSlope", 1)) + float(
        getattr(ds, "RescaleIntercept", 0))
    row_mm, col_mm = (float(v) for v in ds.PixelSpacing)
    pixels = np.repeat(hu[None], 24, axis=0)
    output = model.predict(volume_from_array(pixels, (1.0, row_mm, col_mm)))
    area = float(output.segments[0].mask[12].sum())
    return {"case": "JoHof/lungmask LIDC slice (stacked x24)", "area_pixels": area,
            "lungmask_r231_area_pixels": LUNGMASK_R231_PIXELS_PER_SLICE,
            "area_error_pct": 100 * (area - LUNGMASK_R231_PIXELS_PER_SLICE) / LUNGMASK_R231_PIXELS_PER_SLICE}


def speed(model) -> dict:
    rng = np.random.default_rng(0)
    z, y, x = np.ogrid[:400, :512, :512]
    pixels = np.where(((y - 256) / 200) ** 2 + ((x - 256) / 240) ** 2 < 1, 40, -1000).astype(np.float32)
    for cx in (150, 362):
        lung = ((y - 240) / 150) ** 2 + ((x - cx) / 85) ** 2 + ((z - 250) / 200) ** 2 < 1
        pixels = np.where(lung, -850, pixels).astype(np.float32)
    pixels += rng.normal(0, 20, pixels.shape[1:]).astype(np.float32)  # cheap noise, same per slice
    volume = volume_from_array(pixels, (1.0, 0.7, 0.7))
    model.predict(volume)  # warm-up
    started = time.time()
    model.predict(volume)
    return {"case": "synthetic 400x512x512", "seconds": time.time() - started, "threads": torch.get_num_threads()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--speed", action="store_true", help="also time a 400-slice 512x512 CT")
    args = parser.parse_args(argv)
    model = load_model(find_manifests()["lung_ct_seg"])
    results = [evaluate_totalsegmentator(model, args.data), evaluate_lungmask_slice(model, args.data)]
    if args.speed:
        results.append(speed(model))
    for result in results:
        print(result.pop("case"))
        for key, value in result.items():
            print(f"  {key}: {value:.3f}" if isinstance(value, float) else f"  {key}: {value}")


if __name__ == "__main__":
    main()
