"""Engine and sessions for SQLite (embedded default, WAL) and PostgreSQL (scaled out)."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

log = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).parent / "migrations"
MIGRATION_LOCK = 0x44414E4D  # the PostgreSQL advisory lock key held while migrating ("DANM")


def _sqlite_pragmas(dbapi_connection, _record):
    cursor = dbapi_connection.cursor()
    # WAL: readers (CLI, web) never block the receiver; FULL: a commit survives power loss,
    # because success is returned to the scanner only after the commit.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


class Database:
    def __init__(self, url: str):
        self.url = url
        if url.startswith("sqlite"):
            path = url.split("sqlite:///", 1)[-1]
            if path and path != ":memory:":
                Path(path).parent.mkdir(parents=True, exist_ok=True)
            self.engine: Engine = create_engine(url, connect_args={"check_same_thread": False,
                                                                   "timeout": 30})
            event.listen(self.engine, "connect", _sqlite_pragmas)
        else:
            # pre-ping: a connection cut by a server restart is replaced, not handed out; a connect
            # timeout: an unreachable server costs 10 s per attempt, not the OS's minutes
            self.engine = create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20,
                                        connect_args={"connect_timeout": 10})
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    @property
    def is_sqlite(self) -> bool:
        return self.engine.dialect.name == "sqlite"

    def wait_until_reachable(self, deadline_s: float = 120.0) -> None:
        """At start: a database server that is not up yet (a host booting, a container starting
        beside ours) is waited for, up to ``deadline_s``, instead of failing the start."""
        give_up = time.monotonic() + deadline_s
        wait = 1.0
        while True:
            try:
                with self.engine.connect() as connection:
                    connection.execute(text("SELECT 1"))
                return
            except OperationalError as error:
                if time.monotonic() + wait > give_up:
                    raise
                log.warning("database not reachable yet (%s); trying again in %.0f s",
                            str(error).splitlines()[0][:200], wait)
                time.sleep(wait)
                wait = min(wait * 2, 10.0)

    def upgrade(self) -> None:
        """Bring the schema to the newest migration (run at every start; a no-op when current)."""
        from alembic import command
        from alembic.config import Config as AlembicConfig

        config = AlembicConfig()
        config.set_main_option("script_location", str(MIGRATIONS))
        with self.engine.begin() as connection:
            if not self.is_sqlite:  # node processes starting at once migrate one after another
                connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK})
            config.attributes["connection"] = connection
            command.upgrade(config, "head")

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A unit of work: commits on success, rolls back on error."""
        session = self._sessions()
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise
        finally:
            session.close()

    def dispose(self) -> None:
        self.engine.dispose()
