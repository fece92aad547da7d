"""Index load: instances/s the index sustains (group commit through IndexWriter), SQLite and
PostgreSQL, with 1 and 4 concurrent writers. No files, no network: the database part alone.

    .venv/bin/python bench/index_load.py [--instances 4000] [--postgres postgresql://postgres@127.0.0.1/test]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pydicom.dataset import Dataset  # noqa: E402
from sqlalchemy import create_engine, text  # noqa: E402

from dicom_ai_node.db.engine import Database  # noqa: E402
from dicom_ai_node.index import ReceivedInstance  # noqa: E402
from dicom_ai_node.receive.index_writer import IndexWriter  # noqa: E402


def header() -> Dataset:
    dataset = Dataset()
    dataset.PatientID, dataset.Modality, dataset.SeriesNumber = "BENCH", "CT", 1
    dataset.ImageOrientationPatient, dataset.SliceThickness = [1, 0, 0, 0, 1, 0], 1.0
    return dataset


def run(url: str, instances: int, writers: int) -> float:
    database = Database(url)
    database.upgrade()
    index = IndexWriter(database)
    known: set[str] = set()
    per_writer = instances // writers

    def work(writer: int):
        for i in range(per_writer):
            series = f"1.2.3.{writer}"
            item = ReceivedInstance("1.2.3", series, f"1.2.3.{writer}.{i}", "1.2.840.10008.5.1.4.1.1.2",
                                    "1.2.840.10008.1.2.1", f"x/{writer}/{i}.dcm", 525_000, "BENCH", header())
            index.record(item, series_known=series in known)
            known.add(series)

    threads = [threading.Thread(target=work, args=(w,)) for w in range(writers)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - start
    index.stop()
    database.dispose()
    return per_writer * writers / elapsed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--instances", type=int, default=4000)
    parser.add_argument("--postgres", default="postgresql://postgres@127.0.0.1:5432/test")
    args = parser.parse_args()
    print(f"{'database':10} {'writers':>7} {'instances/s':>12}")
    with tempfile.TemporaryDirectory() as folder:
        for writers in (1, 4):
            url = f"sqlite:///{folder}/index-{writers}.db"
            print(f"{'sqlite':10} {writers:7d} {run(url, args.instances, writers):12.0f}")
    admin = create_engine(args.postgres, isolation_level="AUTOCOMMIT")
    for writers in (1, 4):
        name = f"dain_bench_{uuid.uuid4().hex[:8]}"
        with admin.connect() as connection:
            connection.execute(text(f'CREATE DATABASE "{name}"'))
        try:
            url = args.postgres.rsplit("/", 1)[0] + f"/{name}"
            print(f"{'postgresql':10} {writers:7d} {run(url, args.instances, writers):12.0f}")
        finally:
            with admin.connect() as connection:
                connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


if __name__ == "__main__":
    main()
