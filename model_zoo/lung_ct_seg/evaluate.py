"""The lung model on every real chest CT case, and on field-of-view stress crops of each.

    .venv/bin/python -m model_zoo.lung_ct_seg.evaluate [--data ../shared/data] [--speed]
        [--weights PATH] [--cases NAME ...] [--thick [MM ...]]

One line per case and per crop (data.CASES, data.STRESS_CROPS): Dice against the case's
reference and the volume error. Every case is segmented by a model that never saw its patient:
the shipped weights.pt when its patient was not in the shipped training set (weights.json
lists those patients), else the cross-validation weights ``folds/without_<patient>.pt`` that
train.py made with ``--exclude <patient>``. ``--weights`` evaluates one weights file on all
cases instead (development). The LIDC slice also gets lungmask R231's published area.
A crop left with fewer slices than the model accepts (model.toml min_slices) is reported
as such, not run. Each line also has the node's own verdict on the result: model.toml [qc]
through model_zoo.quality, as the runner checks it before anything is delivered.

``--thick`` runs the thick-slice section instead of the crops: every case (not the one-slice
LIDC case) at its native spacing and as a thick reconstruction of each thickness (default
THICK_SLICES_MM), with its reference thickened the same way (``thicken``), the same weights.
A thick case with fewer slices than min_slices is run anyway and marked: the node would refuse it.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from model_zoo.ct_data import volume_from_array
from model_zoo.lung_ct_seg.data import (
    CASES,
    DEFAULT_DATA,
    STRESS_CROPS,
    load_case,
    stress_crop,
)
from model_zoo.manifest import load_manifest
from model_zoo.quality import check_output, failures

HERE = Path(__file__).resolve().parent
LUNGMASK_R231_PIXELS_PER_SLICE = (64752 + 36536) / 2  # lungmask tests/test_mask.py, two identical slices
IN_PLANE_CROPS_ONLY = {"lidc_slice"}  # one slice stacked: cutting slices off means nothing
THICK_SLICES_MM = (5.0, 6.0, 8.0, 10.0)
NO_THICK = {"lidc_slice": "one slice stacked 24 times: every thick slice of it is that same slice"}


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = a.sum() + b.sum()
    return float(2 * np.logical_and(a, b).sum() / total) if total else float("nan")


def model_with(weights: Path):
    from model_zoo.lung_ct_seg.model import LungSegmentation

    model = LungSegmentation(load_manifest(HERE / "model.toml"))
    model.network.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return model


def weights_for(patient: str) -> Path:
    """The weights that never saw ``patient``: the shipped ones, else its fold's."""
    trained_on = json.loads((HERE / "weights.json").read_text())["patients"]
    if patient not in trained_on:
        return HERE / "weights.pt"
    fold = HERE / "folds" / f"without_{patient}.pt"
    if not fold.is_file():
        raise FileNotFoundError(f"{fold}: the shipped model saw {patient}; train its fold with "
                                f"python -m model_zoo.lung_ct_seg.train --exclude {patient} --out {fold}")
    return fold


def evaluate_case(model, name: str, data: Path, min_slices: int) -> list[dict]:
    pixels, spacing, reference = load_case(name, data)
    voxel_ml = float(np.prod(spacing)) / 1000
    rows = []
    for crop in ("full", *STRESS_CROPS):
        if crop != "full" and name in IN_PLANE_CROPS_ONLY and crop.endswith("_half"):
            continue
        box = (slice(None),) * 3 if crop == "full" else stress_crop(crop, reference)
        image, truth = np.ascontiguousarray(pixels[box]), reference[box]
        row = {"case": name, "crop": crop, "shape": image.shape, "reference_ml": truth.sum() * voxel_ml}
        if image.shape[0] < min_slices:
            rows.append({**row, "note": f"{image.shape[0]} slices: below the model's minimum of {min_slices}"})
            continue
        volume = volume_from_array(image, spacing)
        started = time.perf_counter()
        output = model.predict(volume)
        mask = output.segments[0].mask
        row.update(seconds=time.perf_counter() - started, dice=dice(mask, truth), predicted_ml=mask.sum() * voxel_ml,
                   qc=failures(check_output(model.manifest, output, volume.voxel_volume_ml)))
        row["volume_error_pct"] = 100 * (row["predicted_ml"] - row["reference_ml"]) / row["reference_ml"]
        if name == "lidc_slice":
            area = float(mask[mask.shape[0] // 2].sum())
            row["note"] = (f"middle slice {area:.0f} px; lungmask R231 {LUNGMASK_R231_PIXELS_PER_SLICE:.0f} px "
                           f"({100 * (area - LUNGMASK_R231_PIXELS_PER_SLICE) / LUNGMASK_R231_PIXELS_PER_SLICE:+.1f} %)"
                           if crop == "full" else "")
        rows.append(row)
    return rows


def thicken(pixels: np.ndarray, reference: np.ndarray, slice_mm: float, thickness: float):
    """What a scanner's thick reconstruction of this scan gives: each thick slice is the mean of
    the native slices over a slab of ``thickness`` mm, slabs side by side (slice spacing =
    thickness, no overlap) from the first slice on; an incomplete last slab is dropped. A native
    slice that straddles a slab border counts with the share of it inside the slab, so the
    thickness is exact even when it is not a multiple of the native spacing (when it is, a slab
    is simply the mean of round(thickness / native) whole slices). The thick reference is lung
    where at least half of the slab is lung in the native reference.
    Returns (thick HU, thick reference)."""
    n = pixels.shape[0]
    count = int(n * slice_mm / thickness + 1e-6)
    edges = np.arange(n + 1) * slice_mm  # native slice k covers edges[k]..edges[k + 1] mm
    image = np.empty((count, *pixels.shape[1:]), np.float32)
    truth = np.empty((count, *pixels.shape[1:]), bool)
    for k in range(count):
        low, high = k * thickness, (k + 1) * thickness
        share = np.clip(np.minimum(edges[1:], high) - np.maximum(edges[:-1], low), 0, None) / thickness
        used = np.flatnonzero(share > 1e-6)
        image[k] = np.tensordot(share[used], pixels[used].astype(np.float32), axes=1)
        truth[k] = np.tensordot(share[used], reference[used].astype(np.float32), axes=1) >= 0.5 - 1e-6
    return image, truth


def evaluate_thick(model, name: str, data: Path, min_slices: int, thicknesses) -> list[dict]:
    """One row for the case at its native spacing, then one per thickness (``thicken``)."""
    pixels, spacing, reference = load_case(name, data)
    rows = []
    for thickness in (None, *thicknesses):
        if thickness is None:
            image, truth, grid = pixels, reference, tuple(spacing)
        else:
            image, truth = thicken(pixels, reference, spacing[0], thickness)
            grid = (thickness, *spacing[1:])
        voxel_ml = float(np.prod(grid)) / 1000
        row = {"case": name, "thickness": "native" if thickness is None else f"{thickness:g} mm",
               "spacing": grid, "shape": image.shape, "reference_ml": truth.sum() * voxel_ml}
        if image.shape[0] < min_slices:
            # the node refuses such a series (model.toml min_slices); run it anyway to show what it would give
            row["note"] = f"{image.shape[0]} slices < min_slices {min_slices}: refused by the node; run anyway"
        volume = volume_from_array(np.ascontiguousarray(image), grid)
        started = time.perf_counter()
        output = model.predict(volume)
        mask = output.segments[0].mask
        row.update(seconds=time.perf_counter() - started, dice=dice(mask, truth), predicted_ml=mask.sum() * voxel_ml,
                   qc=failures(check_output(model.manifest, output, volume.voxel_volume_ml)))
        row["volume_error_pct"] = (100 * (row["predicted_ml"] - row["reference_ml"]) / row["reference_ml"]
                                   if row["reference_ml"] else float("nan"))
        rows.append(row)
    return rows


def thick_markdown(rows: list[dict], weights_of: dict[str, str]) -> str:
    lines = ["| case | thickness | weights | spacing mm (slice x row x col) | slices x rows x cols | reference mL "
             "| predicted mL | volume error | Dice | node's [qc] | seconds |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        spacing = " x ".join(f"{s:.2f}" for s in row["spacing"])
        shape = " x ".join(str(n) for n in row["shape"])
        flag = "" if row["dice"] >= 0.95 else " **(< 0.95)**"
        note = f" ({row['note']})" if row.get("note") else ""
        lines.append(f"| {row['case']} | {row['thickness']} | {weights_of[row['case']]} | {spacing} | {shape} | "
                     f"{row['reference_ml']:.0f} | {row['predicted_ml']:.0f} | {row['volume_error_pct']:+.1f} % | "
                     f"{row['dice']:.3f}{flag}{note} | {'; '.join(row['qc']) or 'pass'} | {row['seconds']:.1f} |")
    return "\n".join(lines)


def markdown(rows: list[dict], weights_of: dict[str, str]) -> str:
    header = ("| case | crop | weights | slices x rows x cols | reference mL | predicted mL | volume error | Dice "
              "| node's [qc] |")
    lines = [header, "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        shape = " x ".join(str(n) for n in row["shape"])
        if "dice" not in row:
            lines.append(f"| {row['case']} | {row['crop']} | | {shape} | {row['reference_ml']:.0f} | – | – | "
                         f"n/a: {row['note']} | |")
            continue
        flag = "" if row["dice"] >= 0.95 else " **(< 0.95)**"
        note = f" ({row['note']})" if row.get("note") else ""
        lines.append(f"| {row['case']} | {row['crop']} | {weights_of[row['case']]} | {shape} | "
                     f"{row['reference_ml']:.0f} | {row['predicted_ml']:.0f} | {row['volume_error_pct']:+.1f} % | "
                     f"{row['dice']:.3f}{flag}{note} | {'; '.join(row['qc']) or 'pass'} |")
    return "\n".join(lines)


def reference_picture(name: str, data: Path, path: Path, tiles: int = 6, size: int = 200) -> None:
    """A PNG of a case's reference over its slices (lung window), to check the reference by eye:
    ``tiles`` axial slices evenly spread over the lungs plus one coronal slice."""
    from PIL import Image

    pixels, spacing, reference = load_case(name, data)
    def tile(image, mask, height):
        grey = np.clip((image + 1000) / 1400 * 255, 0, 255).astype(np.uint8)
        rgb = np.repeat(grey[..., None], 3, axis=2).astype(np.float32)
        rgb[mask] = rgb[mask] * 0.5 + np.array([0, 120, 255]) * 0.5
        return Image.fromarray(rgb.astype(np.uint8)).resize((size, height))

    lung_slices = np.nonzero(reference.any(axis=(1, 2)))[0]
    picks = np.linspace(lung_slices[0], lung_slices[-1], tiles + 2)[1:-1].astype(int)
    images = [tile(pixels[z], reference[z], size) for z in picks]
    row = int(np.nonzero(reference.any(axis=(0, 2)))[0].mean())
    coronal_height = int(size * pixels.shape[0] * spacing[0] / (pixels.shape[2] * spacing[2]))
    images.append(tile(pixels[::-1, row], reference[::-1, row], coronal_height))
    sheet = Image.new("RGB", (size * len(images), max(size, coronal_height)))
    for i, image in enumerate(images):
        sheet.paste(image, (i * size, 0))
    sheet.quantize(128).save(path, optimize=True)  # a palette keeps the file small


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
    started = time.perf_counter()
    model.predict(volume)
    return {"seconds": time.perf_counter() - started, "threads": torch.get_num_threads()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--weights", type=Path, help="evaluate this weights file on every case")
    parser.add_argument("--cases", nargs="*", default=[case.name for case in CASES])
    parser.add_argument("--speed", action="store_true", help="also time a 400-slice 512x512 CT")
    parser.add_argument("--pictures", type=Path, help="write a PNG of each classical reference into this folder")
    parser.add_argument("--thick", type=float, nargs="*", metavar="MM",
                        help="instead of the crops: each case at its native spacing and as thick slices of "
                             f"these thicknesses (default {' '.join(f'{t:g}' for t in THICK_SLICES_MM)})")
    args = parser.parse_args(argv)
    if args.pictures:
        args.pictures.mkdir(parents=True, exist_ok=True)
        for case in CASES:
            if case.reference.startswith("classical") and case.name in args.cases:
                reference_picture(case.name, args.data, args.pictures / f"reference_{case.name}.png")
    min_slices = load_manifest(HERE / "model.toml").input.min_slices
    rows, weights_of, models = [], {}, {}
    for case in CASES:
        if case.name not in args.cases:
            continue
        weights = args.weights or weights_for(case.patient)
        if weights not in models:
            models[weights] = model_with(weights)
        weights_of[case.name] = weights.name
        if args.thick is not None:
            if case.name in NO_THICK:
                print(f"{case.name:20s} skipped: {NO_THICK[case.name]}", flush=True)
                continue
            found = evaluate_thick(models[weights], case.name, args.data, min_slices, args.thick or THICK_SLICES_MM)
        else:
            found = evaluate_case(models[weights], case.name, args.data, min_slices)
        for row in found:
            rows.append(row)
            score = (f"Dice {row['dice']:.3f}, {row['volume_error_pct']:+.1f} %, qc {'FAIL' if row['qc'] else 'pass'}"
                     if "dice" in row else row["note"])
            if "dice" in row and row.get("thickness") and row.get("note"):
                score += f" ({row['note']})"
            print(f"{row['case']:20s} {row.get('crop') or row['thickness']:11s} {score}", flush=True)
    print()
    print(thick_markdown(rows, weights_of) if args.thick is not None else markdown(rows, weights_of))
    if args.speed:
        print(f"\nspeed: {speed(model_with(HERE / 'weights.pt'))}")


if __name__ == "__main__":
    main()
