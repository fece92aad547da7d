"""Runs the web app with uvicorn in a thread of the node process (`dicom-ai-node serve`)."""

from __future__ import annotations

import logging
import threading
import time

import uvicorn

from dicom_ai_node.web.app import create_app
from dicom_ai_node.web.context import WebContext

log = logging.getLogger(__name__)


class WebServer:
    def __init__(self, context: WebContext):
        web = context.config.web
        config = uvicorn.Config(create_app(context), host=web.host, port=web.port, log_level="warning",
                                access_log=False, lifespan="off")
        self.server = uvicorn.Server(config)
        self.server.install_signal_handlers = lambda: None  # the node's main thread owns signals
        self.thread = threading.Thread(target=self.server.run, name="web", daemon=True)
        self.address = f"http://{web.host}:{web.port}"

    def start(self, timeout: float = 10.0) -> None:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise OSError(f"admin web page could not listen on {self.address} (port in use?)")
            time.sleep(0.05)
        log.info("admin page and API on %s (API docs at /docs)", self.address)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=5)
