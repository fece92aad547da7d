"""Receive throughput, side by side: the node vs dcmtk storescp vs Orthanc, same machine, same run.

    .venv/bin/python bench/receive_throughput.py [--slices 400] [--runs 3] [--j2k]

Generates a 512x512 16-bit CT series (400 slices = 205 MB) once, pushes it with dcmtk
storescu on one association and as 4 concurrent associations of slices/4 each, into each
receiver in turn, and prints images/s, MB/s and the node's ratio to each peer (median of
--runs). TCP_NODELAY=1 is set for every dcmtk program (see ../shared/notes/receive-baseline.md).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
from pydicom import dcmread  # noqa: E402

from tests.node_process import NODE_AE, NodeProcess  # noqa: E402
from tests.peers import OrthancPeer, StorescpPeer, free_port, wait_for  # noqa: E402
from tests.synthetic import make_ct_series  # noqa: E402

DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}


def make_series(folder: Path, slices: int, j2k: bool) -> list[Path]:
    marker = folder / ".complete"
    if not marker.exists():
        make_ct_series(folder, shape=(slices, 512, 512), spacing=(1.0, 0.7, 0.7), seed=f"bench-{slices}",
                       noise_hu=20.0)
        if j2k:
            from pydicom.uid import JPEG2000Lossless
            for path in sorted(folder.glob("*.dcm")):
                dataset = dcmread(path)
                dataset.compress(JPEG2000Lossless, generate_instance_uid=False)
                dataset.save_as(path)
        marker.touch()
    return sorted(folder.glob("*.dcm"))


def push(port: int, ae: str, files: list[Path], associations: int, j2k: bool) -> float:
    chunks = [list(chunk) for chunk in np.array_split(np.array(files, dtype=object), associations)]
    args = ["storescu", "-R", "-aec", ae, "-aet", "STORESCU"] + (["-xv"] if j2k else [])
    start = time.perf_counter()
    processes = [subprocess.Popen(args + ["127.0.0.1", str(port), *map(str, chunk)], env=DCMTK_ENV,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for chunk in chunks]
    for process in processes:
        _, error = process.communicate(timeout=600)
        if process.returncode != 0:
            raise RuntimeError(f"storescu failed: {error.decode()[-500:]}")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--slices", type=int, default=400)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--j2k", action="store_true", help="JPEG 2000 lossless variant")
    parser.add_argument("--receivers", type=int, default=1, help="[node] receivers for the node")
    parser.add_argument("--only", choices=["node", "storescp", "orthanc"], action="append",
                        help="measure only these receivers (repeatable)")
    parser.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "dicom-ai-node-bench"))
    args = parser.parse_args()
    files = make_series(Path(args.cache) / f"ct{args.slices}{'-j2k' if args.j2k else ''}", args.slices, args.j2k)
    megabytes = sum(f.stat().st_size for f in files) / 1e6
    results: dict[str, dict[int, float]] = {}

    for receiver in args.only or ("node", "storescp", "orthanc"):
        results[receiver] = {}
        for associations in (1, 4):
            times = []
            for _ in range(args.runs):
                with tempfile.TemporaryDirectory() as workdir:
                    if receiver == "node":
                        peer = NodeProcess(Path(workdir), quiet_period_s=3600.0, rules="")
                        peer.config_path.write_text(peer.config_path.read_text().replace(
                            'log_level = "DEBUG"', f'log_level = "WARNING"\nreceivers = {args.receivers}'))
                        peer.start()
                        port, ae = peer.port, NODE_AE
                    elif receiver == "storescp":
                        peer = StorescpPeer(out_dir=Path(workdir) / "out").start()
                        port, ae = peer.port, "STORESCP"
                    else:
                        peer = OrthancPeer(workdir=Path(workdir) / "orthanc", node_port=free_port()).start()
                        port, ae = peer.dicom_port, "ORTHANC"
                    try:
                        times.append(push(port, ae, files, associations, args.j2k))
                    finally:
                        peer.stop()
            results[receiver][associations] = statistics.median(times)

    print(f"\n{len(files)} images, {megabytes:.0f} MB{' (JPEG 2000 lossless)' if args.j2k else ''}, "
          f"median of {args.runs}")
    print(f"{'receiver':10} {'assoc':>5} {'img/s':>8} {'MB/s':>7}")
    for receiver, by_assoc in results.items():
        for associations, seconds in by_assoc.items():
            print(f"{receiver:10} {associations:>5} {len(files) / seconds:8.0f} {megabytes / seconds:7.1f}")
    for associations in (1, 4) if {"node", "storescp", "orthanc"} <= set(results) else ():
        node = results["node"][associations]
        print(f"{associations} assoc: node/storescp {results['storescp'][associations] / node:.2f}x, "
              f"node/orthanc {results['orthanc'][associations] / node:.2f}x")
    print(json.dumps({r: {str(a): round(len(files) / s, 1) for a, s in v.items()} for r, v in results.items()}))


if __name__ == "__main__":
    main()
