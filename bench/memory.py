"""Memory: the node's peak RSS while receiving a 2,000-slice 512x512 CT study, and while
processing it with the lung model (results delivered to Orthanc).

    .venv/bin/python bench/memory.py [--slices 2000]

The study is made from the 400-slice bench series (bench/receive_throughput.py) repeated
along z with new UIDs, so it is one valid series of --slices slices.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pydicom import dcmread  # noqa: E402
from pydicom.uid import generate_uid  # noqa: E402

from bench.receive_throughput import make_series  # noqa: E402
from bench.time_to_result import start_pacs_and_node  # noqa: E402
from tests.node_process import NODE_AE  # noqa: E402
from tests.peers import wait_for  # noqa: E402
from tests.test_end_to_end import all_results_arrived  # noqa: E402


def long_series(cache: Path, slices: int) -> list[Path]:
    folder = cache / f"ct{slices}-long"
    if not (folder / ".complete").exists():
        folder.mkdir(parents=True, exist_ok=True)
        base = make_series(cache / "ct400", 400, j2k=False)
        series_uid = generate_uid(entropy_srcs=["long", str(slices)])
        for index in range(slices):
            dataset = dcmread(base[index % len(base)])
            z = float(dataset.ImagePositionPatient[2]) + (index // len(base)) * len(base)
            dataset.ImagePositionPatient = [dataset.ImagePositionPatient[0], dataset.ImagePositionPatient[1], z]
            dataset.SeriesInstanceUID = series_uid
            dataset.SOPInstanceUID = dataset.file_meta.MediaStorageSOPInstanceUID = generate_uid(
                entropy_srcs=["long", str(slices), str(index)])
            dataset.InstanceNumber = index + 1
            dataset.save_as(folder / f"{index:05d}.dcm")
        (folder / ".complete").touch()
    return sorted(folder.glob("*.dcm"))


class RssSampler:
    """Polls /proc/PID/status VmRSS every 50 ms (VmHWM would not separate the phases)."""

    def __init__(self, pid: int):
        self.pid, self.peak, self._stop = pid, 0.0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.wait(0.05):
            try:
                with open(f"/proc/{self.pid}/status") as handle:
                    for line in handle:
                        if line.startswith("VmRSS:"):
                            self.peak = max(self.peak, int(line.split()[1]) / 1024)
            except FileNotFoundError:
                return

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.peak


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--slices", type=int, default=2000)
    parser.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "dicom-ai-node-bench"))
    args = parser.parse_args()
    files = long_series(Path(args.cache), args.slices)
    study_uid = dcmread(files[0], stop_before_pixels=True).StudyInstanceUID
    with tempfile.TemporaryDirectory() as workdir:
        orthanc, node = start_pacs_and_node(Path(workdir))
        try:
            sampler = RssSampler(node.process.pid)
            start = time.perf_counter()
            subprocess.run(["storescu", "-R", "-aec", NODE_AE, "127.0.0.1", str(node.port), *map(str, files)],
                           check=True, env={**os.environ, "TCP_NODELAY": "1"}, capture_output=True)
            receiving = sampler.stop()
            received_s = time.perf_counter() - start
            sampler = RssSampler(node.process.pid)
            wait_for(lambda: all_results_arrived(orthanc, study_uid), timeout=1200, interval=0.5)
            processing = sampler.stop()
            job = node.study(study_uid)["jobs"][0]
        finally:
            node.stop()
            orthanc.stop()
    print(f"{len(files)} slices received in {received_s:.0f} s")
    print(f"peak RSS while receiving:  {receiving:.0f} MB")
    print(f"peak RSS while processing: {processing:.0f} MB  (job timings {job['timings']})")


if __name__ == "__main__":
    main()
