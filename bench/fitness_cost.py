"""What the fitness check before inference costs (issue 18): a synthetic chest CT of N slices of
512 x 512 read as a job reads it, the old way (headers, then load_series) against the new
(headers, check_fitness: plan, model input, pixels, UIDs, Frame of Reference, the copied
modules of every header made valid; then read_volume), median of R runs each, same process.

    .venv/bin/python bench/fitness_cost.py [--slices 400] [--repeat 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dicom_ai_node.imaging.load import load_series, read_header, read_volume  # noqa: E402
from dicom_ai_node.jobs.fitness import check_fitness  # noqa: E402
from model_zoo.registry import find_manifests  # noqa: E402
from tests.synthetic import make_ct_series  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--slices", type=int, default=400)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    manifest = find_manifests()["lung_ct_seg"]
    with tempfile.TemporaryDirectory() as folder:
        series = make_ct_series(Path(folder), shape=(args.slices, 512, 512), spacing=(1.0, 0.7, 0.7),
                                noise_hu=0.0, seed="fitness-cost")
        paths = series.paths
        old, new, check = [], [], []
        for _ in range(args.repeat):
            started = time.perf_counter()
            load_series(paths, [read_header(path) for path in paths])
            old.append(time.perf_counter() - started)

            started = time.perf_counter()
            headers = [read_header(path) for path in paths]
            checked = time.perf_counter()
            fitness = check_fitness(manifest, paths, headers)
            check.append(time.perf_counter() - checked)
            assert fitness.fit, fitness.refusals
            read_volume(fitness.plan)
            new.append(time.perf_counter() - started)
    before, now = statistics.median(old), statistics.median(new)
    print(f"{args.slices} slices of 512 x 512, median of {args.repeat}: headers + load_series {before:.3f} s; "
          f"headers + check_fitness + read_volume {now:.3f} s (check_fitness alone "
          f"{statistics.median(check):.3f} s, ratio {now / before:.2f})")


if __name__ == "__main__":
    main()
