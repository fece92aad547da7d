"""How many login attempts a user name and a client address get: failures are counted per
user name and per address; after too many within a window, that name or address is locked for
a while, twice as long at each further lock. In memory, bounded, one instance per web app.

Every attempt is counted before its password is checked (`begin`), so parallel attempts cannot
slip past the limit while the first ones are still being hashed. Only attempts that get past
`begin` create records, so an address that is locked cannot fill the table with new names.
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

MAX_FAILURES = {"user": 5, "address": 20}  # within WINDOW_S; an address may hold many users (NAT, proxy)
WINDOW_S = 300.0
FIRST_LOCK_S = 30.0  # then 60, 120, ... up to MAX_LOCK_S
MAX_LOCK_S = 3600.0
MAX_TRACKED = 10_000  # records (user names and addresses together); ~2 MB at most
IN_FLIGHT_RETRY_S = 1.0  # the limit is reached by attempts still being checked: ask again shortly


@dataclass
class _Record:
    last_seen: float
    window_start: float
    failures: int = 0  # in the window that began at window_start
    pending: int = 0  # attempts past begin() whose password is being checked
    locks: int = 0  # locks so far; each lasts twice as long as the one before
    locked_until: float = 0.0


@dataclass(frozen=True)
class Lock:
    kind: str  # "user" or "address"
    key: str
    seconds: float


class LoginLimiter:
    def __init__(self, max_failures: dict[str, int] | None = None, window_s: float = WINDOW_S,
                 first_lock_s: float = FIRST_LOCK_S, max_lock_s: float = MAX_LOCK_S,
                 max_tracked: int = MAX_TRACKED, clock: Callable[[], float] = time.monotonic):
        self.max_failures = max_failures or dict(MAX_FAILURES)
        self.window_s, self.first_lock_s, self.max_lock_s = window_s, first_lock_s, max_lock_s
        self.forget_s = max(window_s, max_lock_s)  # a record untouched this long holds nothing
        self.max_tracked = max_tracked
        self.clock = clock
        self._records: OrderedDict[tuple[str, str], _Record] = OrderedDict()  # least recently seen first
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._records)

    def begin(self, name: str, address: str) -> int:
        """0: go ahead (the attempt is counted until failed() or succeeded()); otherwise the
        seconds to wait before trying again (Retry-After)."""
        keys = self._keys(name, address)
        with self._lock:
            now = self.clock()
            wait = 0.0
            for kind, key in keys:
                record = self._records.get((kind, key))
                if record is None:
                    continue
                self._roll_window(record, now)
                if record.locked_until > now:
                    wait = max(wait, record.locked_until - now)
                elif record.failures + record.pending >= self.max_failures[kind]:
                    wait = max(wait, IN_FLIGHT_RETRY_S)
            if wait:
                return math.ceil(wait)
            for kind, key in keys:
                self._touch(kind, key, now).pending += 1
            return 0

    def failed(self, name: str, address: str) -> list[Lock]:
        """A wrong password for an attempt begin() let through; the locks it started."""
        started = []
        with self._lock:
            now = self.clock()
            for kind, key in self._keys(name, address):
                record = self._touch(kind, key, now)
                record.pending = max(0, record.pending - 1)
                record.failures += 1
                if record.failures >= self.max_failures[kind]:
                    seconds = min(self.first_lock_s * 2 ** record.locks, self.max_lock_s)
                    record.locks += 1
                    record.locked_until = now + seconds
                    record.failures, record.window_start = 0, now
                    started.append(Lock(kind, key, seconds))
        return started

    def succeeded(self, name: str, address: str) -> None:
        """The right password: the user's record is forgotten; the address keeps its failures
        (one valid account must not wash out guesses at the others)."""
        with self._lock:
            self._records.pop(("user", name), None)
            record = self._records.get(("address", address))
            if record is not None:
                record.pending = max(0, record.pending - 1)

    @staticmethod
    def _keys(name: str, address: str) -> tuple[tuple[str, str], tuple[str, str]]:
        return ("user", name), ("address", address)

    def _roll_window(self, record: _Record, now: float) -> None:
        if now - record.window_start > self.window_s:
            record.failures, record.window_start = 0, now

    def _touch(self, kind: str, key: str, now: float) -> _Record:
        record = self._records.get((kind, key))
        if record is None:
            self._make_room(now)
            record = self._records[(kind, key)] = _Record(last_seen=now, window_start=now)
        else:
            self._roll_window(record, now)
            record.last_seen = now
            self._records.move_to_end((kind, key))
        return record

    def _make_room(self, now: float) -> None:
        # records untouched for forget_s hold no failures and no lock (locks never outlast max_lock_s)
        while self._records:
            oldest = next(iter(self._records.values()))
            if now - oldest.last_seen <= self.forget_s and len(self._records) < self.max_tracked:
                break
            self._records.popitem(last=False)
