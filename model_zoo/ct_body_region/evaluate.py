"""Measure the body-region classifier on real CT: held-out slices, then whole series.

    .venv/bin/python -m model_zoo.ct_body_region.evaluate [--data ../shared/data]

1. Slices: data.EVAL_FILES (patients not trained on; region read by eye; identical slices
   counted once), each classified on its own (as a one-slice series): accuracy per slice.
2. Series: ``predict()`` (exactly what the node runs) on every real CT volume of the lung model's
   cases (lung_ct_seg.data.CASES) and on the field-of-view stress crops of the chest cases the
   model never saw (the upper/lower halves change the true region), plus the headsq head CT;
   with the model.toml [qc] verdict (model_zoo.quality, as the node checks it). Each slice's
   true region comes from the case's labels (``slice_regions``); the series should say the
   region most of its labelled slices show. Volumes of the training patients are marked: they
   are not evidence.
"""

from __future__ import annotations

import argparse
import hashlib
import time
from pathlib import Path

import numpy as np
import torch

from model_zoo.ct_body_region import data
from model_zoo.ct_body_region.model import CLASSES, BodyRegionClassifier
from model_zoo.ct_data import volume_from_array
from model_zoo.lung_ct_seg.data import CASES, STRESS_CROPS, load_case, stress_crop
from model_zoo.manifest import load_manifest
from model_zoo.quality import check_output

# volumes of the training patients (data.py): not evidence
TRAINED_ON = {"cta_cardiac": "patient B", "cta_chest_abdomen": "patient B", "abdomen_lung_bases": "patient A",
              "abdomen_lung_bases_sm": "patient A", "headsq": "head"}
CHEST_FRACTION = 0.03  # a slice is chest when its lungs cover at least this much of it (as in data.patient_b)


def slice_regions(name: str, reference: np.ndarray, data_folder: Path) -> np.ndarray:
    """The true region (index in CLASSES, -1: ambiguous or no class) of every slice of a case.

    Patient A (abdomen_lung_bases and its top 30 slices): data.patient_a's labels from
    TotalSegmentator's organs (lung, liver/spleen/stomach, hip bones). Every other case, from
    its lung reference: chest where the lungs cover >= 3 % of the slice; abdomen for slices
    below the lowest lung slice (none of these scans reaches the pelvis); the rest (lung bases
    under 3 %, neck above the apices) fits no class or is ambiguous."""
    if name.startswith("abdomen_lung_bases"):
        return data.patient_a(data_folder)[2][-len(reference):]
    fraction = reference.mean(axis=(1, 2))
    region = np.full(len(reference), -1)
    region[fraction >= CHEST_FRACTION] = CLASSES.index("chest")
    lung = np.nonzero(fraction > 0)[0]
    region[:lung[0] if lung.size else 0] = CLASSES.index("abdomen")  # slices run inferior -> superior
    return region


def series_volumes(data_folder: Path):
    """(case, crop, HU pixels, spacing, true region per slice) for every series evaluated."""
    for case in CASES:
        pixels, spacing, reference = load_case(case.name, data_folder)
        regions = slice_regions(case.name, reference, data_folder)
        yield case.name, "full", pixels, spacing, regions
        if case.name in TRAINED_ON or case.name == "lidc_slice":  # trained on; one slice stacked
            continue
        for crop in STRESS_CROPS:
            box = stress_crop(crop, reference)
            yield case.name, crop, np.ascontiguousarray(pixels[box]), spacing, regions[box[0]]
    pixels, spacing, regions = data.head(data_folder)
    yield "headsq", "full", pixels, spacing, regions


def series_rows(model, data_folder: Path) -> list[dict]:
    rows = []
    for name, crop, pixels, spacing, regions in series_volumes(data_folder):
        volume = volume_from_array(pixels, spacing)
        output = model.predict(volume)
        finding = output.findings[0]
        counts = np.bincount(regions[regions >= 0], minlength=len(CLASSES))
        per_slice = np.argmax(model.slice_probabilities(pixels, spacing), axis=1)
        labelled = regions >= 0
        rows.append({"case": name, "crop": crop, "trained": TRAINED_ON.get(name, ""), "slices": len(pixels),
                     "spacing": spacing, "counts": counts, "left_out": int((~labelled).sum()),
                     "truth": CLASSES[int(np.argmax(counts))] if counts.any() else None,
                     "said": finding.value, "probability": finding.probability,
                     "qc": all(c.passed for c in check_output(model.manifest, output, volume.voxel_volume_ml)),
                     "slices_right": int((per_slice[labelled] == regions[labelled]).sum()),
                     "labelled": int(labelled.sum())})
        print(f"{name:22s} {crop:11s} {finding.value:8s} {finding.probability:.2f}", flush=True)
    return rows


def series_markdown(rows: list[dict]) -> str:
    lines = [("| case | crop | trained on | slices, spacing mm | true slices (chest/abdomen/pelvis/head/none) | "
              "should say | said | probability | QC >= 0.6 | slices right |"), "|---" * 10 + "|"]
    for r in rows:
        counts = "/".join(str(int(n)) for n in r["counts"][[1, 2, 3, 0]]) + f"/{r['left_out']}"
        right = r["said"] == r["truth"]
        said = r["said"] if right else f"**{r['said']}**"
        trained = f"**yes ({r['trained']})**" if r["trained"] else "no"
        spacing = "x".join(f"{s:.2g}" for s in r["spacing"])
        lines.append(f"| {r['case']} | {r['crop']} | {trained} | {r['slices']}, {spacing} | {counts} | {r['truth']} | "
                     f"{said} | {r['probability']:.2f} | {'pass' if r['qc'] else '**fail**'} | "
                     f"{r['slices_right']}/{r['labelled']} |")
    return "\n".join(lines)


def held_out_slices(model, data_folder: Path) -> None:
    seen, rows = set(), []
    for region, relative, hu, spacing in data.eval_slices(data_folder):
        digest = hashlib.sha1(hu.tobytes()).hexdigest()
        if digest in seen:
            continue
        seen.add(digest)
        probability = model.slice_probabilities(hu[None], (1.0, *spacing))[0]
        rows.append((region, CLASSES[int(np.argmax(probability))], float(probability.max()), relative))
    print("| slice | truth | predicted | probability |\n|---|---|---|---|")
    for truth, predicted, p, relative in rows:
        print(f"| {relative.split('/')[-1][-40:]} | {truth} | {predicted} | {p:.2f} |")
    correct = sum(t == p for t, p, _, _ in rows)
    print(f"\naccuracy {correct}/{len(rows)} = {correct / len(rows):.0%}")
    for name in CLASSES:
        n = sum(t == name for t, _, _, _ in rows)
        hits = sum(t == name == p for t, p, _, _ in rows)
        print(f"  {name}: {hits}/{n}" + ("  (no held-out slices: not measured)" if n == 0 else ""))
    confusion = np.zeros((len(CLASSES), len(CLASSES)), int)
    for truth, predicted, _, _ in rows:
        confusion[CLASSES.index(truth), CLASSES.index(predicted)] += 1
    print("confusion (rows truth, columns predicted, order " + ", ".join(CLASSES) + "):")
    print(confusion)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=data.DEFAULT_DATA)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    started = time.time()
    model = BodyRegionClassifier(load_manifest(Path(__file__).parent / "model.toml"), "cpu")
    held_out_slices(model, args.data)
    print()
    print(series_markdown(series_rows(model, args.data)))
    print(f"\n({time.time() - started:.0f}s, {torch.get_num_threads()} thread)")


if __name__ == "__main__":
    main()
