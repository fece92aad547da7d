"""An extra receiver process: the same Storage SCP on the same port (SO_REUSEPORT).

One Python process cannot use more than one core for DICOM protocol handling; with
``[node] receivers = N`` the node starts N-1 of these beside its own listener and the kernel
spreads incoming associations across them. They only store and index; completion, jobs and
delivery stay in the main process, which reads what they wrote from the database.

    python -m dicom_ai_node.receive.worker --config config.toml
"""

from __future__ import annotations

import argparse
import os
import signal
import threading
from dataclasses import replace

from dicom_ai_node import logs
from dicom_ai_node.config import load_config
from dicom_ai_node.db.engine import Database
from dicom_ai_node.receive.scp import StorageSCP
from dicom_ai_node.storage import Storage


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    parser.add_argument("--port", type=int, help="the DICOM port of the node that started us (serve --port)")
    parser.add_argument("--incoming", help="that node's folder under storage/incoming (it clears it at start)")
    args = parser.parse_args()
    config = load_config(args.config)
    if args.port is not None:
        config = replace(config, node=replace(config.node, port=args.port))
    logs.configure(config.node.log_level, config.node.log_phi, process_label=f"receiver-{os.getpid()} ")
    parent = os.getppid()
    database = Database(config.database_url)  # the main process has migrated the schema
    storage = Storage(config.node.storage_dir, config.node.min_free_disk_mb * 2**20, incoming_name=args.incoming)
    scp = StorageSCP(config.node, database, storage)
    scp.start(shared_port=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    # also stop when the node that started us is gone (e.g. it was killed)
    while not stop.wait(1.0) and os.getppid() == parent:
        pass
    scp.stop()
    database.dispose()


if __name__ == "__main__":
    main()
