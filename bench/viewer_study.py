"""A study for the OHIF viewer check (../shared/tools/viewer-check): a synthetic chest CT sent
through a real node (lung_ct_seg) into Orthanc; the source images and every result that
arrived in Orthanc are written to OUT, ready for check_viewer.sh.

    .venv/bin/python bench/viewer_study.py OUT [--slices 60] [--size 128]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.time_to_result import start_pacs_and_node  # noqa: E402
from tests.node_process import NODE_AE  # noqa: E402
from tests.peers import storescu, storescu_failures, wait_for  # noqa: E402
from tests.synthetic import make_ct_series  # noqa: E402
from tests.test_end_to_end import all_results_arrived  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--slices", type=int, default=60)
    parser.add_argument("--size", type=int, default=128)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as workdir:
        series = make_ct_series(Path(workdir) / "ct", shape=(args.slices, args.size, args.size),
                                spacing=(2.5, 2.5, 2.5), seed="viewer-check")
        orthanc, node = start_pacs_and_node(Path(workdir))
        try:
            failures = storescu_failures(storescu("127.0.0.1", node.port, Path(workdir) / "ct", NODE_AE))
            if failures:
                raise SystemExit(f"storescu failed: {failures[:3]}")
            wait_for(lambda: all_results_arrived(orthanc, series.study_instance_uid), timeout=300,
                     what="SEG, SR and key images in Orthanc")
            for number, orthanc_id in enumerate(orthanc.instances()):  # the results
                (args.out / f"result-{number:04d}.dcm").write_bytes(orthanc.instance_file(orthanc_id))
            for path in series.paths:  # the source images, as the scanner sent them
                (args.out / f"source-{path.name}").write_bytes(path.read_bytes())
        finally:
            node.stop()
            orthanc.stop()
    print(f"{len(list(args.out.glob('*.dcm')))} files in {args.out} (study {series.study_instance_uid})")


if __name__ == "__main__":
    main()
