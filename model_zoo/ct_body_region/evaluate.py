"""Measure the body-region classifier on real CT slices of patients it never saw in training.

    .venv/bin/python -m model_zoo.ct_body_region.evaluate [--data ../shared/data]

The slices and their regions are data.EVAL_FILES (read by eye; identical slices counted once).
Each slice is classified on its own (as a one-slice series), so accuracy here is per slice.
"""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

import numpy as np
import torch

from model_zoo.ct_body_region import data
from model_zoo.ct_body_region.model import CLASSES, BodyRegionClassifier
from model_zoo.manifest import load_manifest


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=data.DEFAULT_DATA)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    model = BodyRegionClassifier(load_manifest(Path(__file__).parent / "model.toml"), "cpu")
    seen, rows = set(), []
    for region, relative, hu, spacing in data.eval_slices(args.data):
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


if __name__ == "__main__":
    main()
