"""Inference benchmark: time and peak memory per study for each bundled model, on the CPU.

    .venv/bin/python bench/inference.py [--threads 1] [--slices 400] [--models ct_denoise,...]
                                        [--write docs/benchmarks.md]

Studies: a synthetic 400 x 512 x 512 CT (0.7 x 0.7 x 1.25 mm, body, lungs, bone, 10 HU noise)
and the real TotalSegmentator volumes (../shared/data). Each (model, study) runs in a fresh
process so the peak resident memory (ru_maxrss) belongs to that run alone: it includes the
Python/torch runtime and the input volume (reported separately, as "before"), as a node
worker's would. Times: model load, and predict() (one call, after the load; the study is
already in memory, DICOM reading and result encoding are not included). With --write the
table is appended to the file as a new section with the machine (lscpu) and date.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MODELS = ("lung_ct_seg", "ct_denoise", "ct_body_region")
REAL = {
    "real abdomen/pelvis 112x101x122 @3 mm": "example_ct.nii.gz",
    "real chest CTA 164x126x120 @1.5 mm": "aorta_report/test_result/models/ct_cropped.nii.gz",
}


def synthetic_ct(slices: int):
    import numpy as np

    rows = cols = 512
    rng = np.random.default_rng(0)
    y, x = np.mgrid[:rows, :cols]
    y, x = (y - rows / 2) / (rows / 2), (x - cols / 2) / (cols / 2)
    body = (y / 0.7) ** 2 + (x / 0.9) ** 2 <= 1
    lungs = (((y + 0.05) / 0.45) ** 2 + ((np.abs(x) - 0.42) / 0.3) ** 2) <= 1
    spine = ((y - 0.45) / 0.1) ** 2 + (x / 0.1) ** 2 <= 1
    plane = np.full((rows, cols), -1000.0, np.float32)
    plane[body] = 40.0
    plane[lungs] = -850.0
    plane[spine] = 700.0
    volume = np.empty((slices, rows, cols), np.float32)
    for i in range(slices):
        volume[i] = plane + rng.normal(0, 10, (rows, cols)).astype(np.float32)
    return volume, (1.25, 0.7, 0.7)


def one(model_name: str, case: str, threads: int, slices: int) -> dict:
    import numpy as np
    import torch

    torch.set_num_threads(threads)
    from dicom_ai_node.models import ModelRegistry
    from model_zoo.ct_data import DEFAULT_DATA, TOTALSEG, load_nifti, volume_from_array

    if case == "synthetic":
        pixels, spacing = synthetic_ct(slices)
    else:
        pixels, spacing = load_nifti(DEFAULT_DATA / TOTALSEG / case)
    volume = volume_from_array(pixels, spacing, {"Modality": "CT", "RescaleSlope": 1, "RescaleIntercept": -1024})
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    registry = ModelRegistry()
    manifest = registry.manifest(model_name)
    started = time.perf_counter()
    model = registry.load(manifest)
    loaded = time.perf_counter()
    output = model.predict(volume)
    done = time.perf_counter()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"model": model_name, "shape": list(pixels.shape), "load_s": loaded - started,
            "predict_s": done - loaded, "rss_before_mb": before, "peak_rss_mb": peak,
            "findings": [(f.value, round(f.probability, 3)) for f in output.findings],
            "measurements": [(m.name, round(m.value, 2)) for m in output.measurements]}


def machine() -> str:
    model = platform.processor()
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    import os

    return f"{model}, {os.cpu_count()} logical CPUs"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run (default 1)")
    parser.add_argument("--slices", type=int, default=400, help="slices of the synthetic 512x512 CT")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--no-real", action="store_true", help="only the synthetic study")
    parser.add_argument("--write", type=Path, help="append the results as a section to this markdown file")
    parser.add_argument("--one", nargs=2, metavar=("MODEL", "CASE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(one(args.one[0], args.one[1], args.threads, args.slices)))
        return 0

    cases = {f"synthetic {args.slices}x512x512 @0.7 mm": "synthetic"}
    if not args.no_real:
        cases.update(REAL)
    rows = []
    for model_name in args.models.split(","):
        for label, case in cases.items():
            run = subprocess.run([sys.executable, __file__, "--threads", str(args.threads), "--slices",
                                  str(args.slices), "--one", model_name, case], capture_output=True, text=True,
                                 cwd=ROOT)
            if run.returncode != 0:
                print(f"{model_name} on {label} failed:\n{run.stderr[-2000:]}", file=sys.stderr)
                continue
            result = json.loads(run.stdout.strip().splitlines()[-1])
            rows.append((label, result))
            print(f"{model_name:16} {label:40} load {result['load_s']:.2f}s predict {result['predict_s']:.1f}s "
                  f"peak RSS {result['peak_rss_mb']:.0f} MB (input loaded: {result['rss_before_mb']:.0f} MB)",
                  flush=True)

    table = ["| model | study | load s | predict s | peak RSS MB | RSS with input, before the model MB |",
             "|---|---|---|---|---|---|"]
    for label, r in rows:
        table.append(f"| {r['model']} | {label} | {r['load_s']:.2f} | {r['predict_s']:.1f} | "
                     f"{r['peak_rss_mb']:.0f} | {r['rss_before_mb']:.0f} |")
    section = "\n".join([
        f"\n## Inference per study, CPU ({datetime.date.today().isoformat()})\n",
        f"Machine: {machine()}; torch threads per run: {args.threads}; "
        f"command: `.venv/bin/python bench/inference.py --threads {args.threads}`. "
        "Each run is a fresh process; peak RSS includes the runtime and the input volume "
        "(last column: after loading the input, before the model). predict() only: no DICOM "
        "reading or result encoding.\n",
        *table, ""])
    print(section)
    if args.write:
        with open(args.write, "a", encoding="utf-8") as out:
            if out.tell() == 0:
                out.write("# Benchmarks\n")
            out.write(section)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
