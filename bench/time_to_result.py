"""Time to result: from the last C-STORE response of a 400-slice CT (one association) to the
results stored in Orthanc, split into completion wait, volume load, inference, encoding and
delivery (from the job's own timings), plus the node's peak RSS.

    .venv/bin/python bench/time_to_result.py [--slices 400]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.receive_throughput import make_series  # noqa: E402
from tests.node_process import NODE_AE, NodeProcess  # noqa: E402
from tests.peers import OrthancPeer, free_port, wait_for  # noqa: E402
from tests.test_end_to_end import RULES, all_results_arrived  # noqa: E402


def start_pacs_and_node(workdir: Path) -> tuple[OrthancPeer, NodeProcess]:
    """Orthanc as the PACS and a node routing CT chest series to the lung model, logging at INFO."""
    orthanc = OrthancPeer(workdir=workdir / "orthanc", node_port=free_port()).start()
    node = NodeProcess(workdir / "node", port=orthanc.node_port, destination_port=orthanc.dicom_port,
                       rules=RULES, quiet_period_s=5.0)
    node.config_path.write_text(node.config_path.read_text().replace('log_level = "DEBUG"', 'log_level = "INFO"'))
    return orthanc, node.start()


def peak_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--slices", type=int, default=400)
    parser.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "dicom-ai-node-bench"))
    args = parser.parse_args()
    files = make_series(Path(args.cache) / f"ct{args.slices}", args.slices, j2k=False)
    with tempfile.TemporaryDirectory() as workdir:
        orthanc, node = start_pacs_and_node(Path(workdir))
        try:
            start = time.perf_counter()
            subprocess.run(["storescu", "-R", "-aec", NODE_AE, "127.0.0.1", str(node.port),
                            *map(str, files)], check=True, env={**os.environ, "TCP_NODELAY": "1"},
                           capture_output=True)
            sent = time.perf_counter()
            study_uid = __import__("pydicom").dcmread(files[0], stop_before_pixels=True).StudyInstanceUID
            wait_for(lambda: all_results_arrived(orthanc, study_uid), timeout=600, interval=0.05)
            arrived = time.perf_counter()
            detail = node.study(study_uid)
            rss = peak_rss_mb(node.process.pid)
        finally:
            node.stop()
            orthanc.stop()
    job = detail["jobs"][0]
    parse = datetime.fromisoformat
    completion_wait = (parse(job["created_at"]) - parse(detail["last_received_at"])).total_seconds()
    timings = job["timings"]
    outside = arrived - sent - timings["inference_s"]
    print(f"{len(files)} slices sent in {sent - start:.1f} s ({len(files) / (sent - start):.0f} img/s)")
    print(f"last C-STORE response -> results in Orthanc: {arrived - sent:.2f} s")
    print(f"  completion wait   {completion_wait:.2f} s  (association release + grace)")
    for step in ("load_s", "inference_s", "encode_s", "delivery_s"):
        print(f"  {step[:-2]:17} {timings.get(step, float('nan')):.2f} s")
    print(f"everything but inference: {outside:.2f} s; node peak RSS {rss:.0f} MB")


if __name__ == "__main__":
    main()
