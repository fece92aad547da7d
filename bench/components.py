"""Connected components: scipy.ndimage.label against the hand-written union-find it replaced.

    .venv/bin/python bench/components.py [--data ../shared/data] [--repeat 3]

lung_ct_seg 1.1.0 labelled components with its own vectorised union-find (``label_components``,
read here from git history, commit 8b2abc4, so the comparison stays reproducible); 2.0.0 uses
scipy.ndimage.label. Both label the same masks of a real chest CT (NSCLC LUNG1-001, 134 x 512
x 512): the air mask (< -400 HU) on the native grid and on the model's ~2.5 mm grid. Prints the
best of ``--repeat`` wall times and checks that both give the same partition.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
OLD_COMMIT = "8b2abc4"  # lung_ct_seg 1.1.0, the last version with the union-find


def old_label_components():
    source = subprocess.run(["git", "-C", str(ROOT), "show", f"{OLD_COMMIT}:model_zoo/lung_ct_seg/model.py"],
                            check=True, capture_output=True, text=True, timeout=30).stdout
    module = types.ModuleType("lung_ct_seg_1_1_0")
    exec(compile(source, "lung_ct_seg 1.1.0 model.py", "exec"), module.__dict__)  # noqa: S102 - this repo's own history
    return module.label_components


def best_of(repeat: int, function, *args) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeat):
        started = time.perf_counter()
        result = function(*args)
        times.append(time.perf_counter() - started)
    return min(times), result


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """Two labelings describe the same components: the label pairs map one to one."""
    if not np.array_equal(a > 0, b > 0):
        return False
    pairs = np.unique(np.stack([a[a > 0], b[b > 0]]), axis=1)
    return len(np.unique(pairs[0])) == len(np.unique(pairs[1])) == pairs.shape[1]


def main(argv=None):
    from model_zoo.lung_ct_seg.data import DEFAULT_DATA, load_case
    from model_zoo.lung_ct_seg.model import coarse_shape

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    union_find = old_label_components()
    pixels, spacing, _ = load_case("nsclc_lung1", args.data)
    native = pixels < -400
    factors = [n / c for n, c in zip(native.shape, coarse_shape(native.shape, spacing))]
    coarse = ndi.zoom(native.astype(np.float32), [1 / f for f in factors], order=1) > 0.5
    for name, mask in (("native", native), ("coarse", coarse)):
        scipy_s, scipy_labels = best_of(args.repeat, lambda m: ndi.label(m)[0], mask)
        old_s, old_labels = best_of(args.repeat, union_find, mask)
        same = same_partition(scipy_labels, old_labels)
        print(f"{name:6s} {'x'.join(map(str, mask.shape)):12s} scipy.ndimage.label {1000 * scipy_s:7.0f} ms   "
              f"union-find (1.1.0) {1000 * old_s:7.0f} ms   ratio {old_s / scipy_s:4.1f}x   same components: {same}")


if __name__ == "__main__":
    main()
