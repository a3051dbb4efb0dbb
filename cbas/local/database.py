"""The local backend's SQLite file, used from an event loop without ever holding it.

A statement takes microseconds, so it runs at once on the loop, through a connection that never
waits for a lock (busy timeout 0): a thread hop per statement would cost more than the statement
(it halved the master's message rate). Only when another process holds the write lock (`cbas
status`, a backup) does the statement wait for it, up to 10 s, on the database's own thread and
its own connection, never on the loop. Used by the job store; the local bus keeps its one
connection on a thread of its own (with a second, idle connection of this kind in each worker's
bus, workers stopped pinging after a clean master restart: not understood yet, see the note).
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, TypeVar

import structlog

log = structlog.get_logger(__name__)
T = TypeVar("T")
Work = Callable[[sqlite3.Connection], T]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (id TEXT PRIMARY KEY, state TEXT NOT NULL, version INTEGER NOT NULL, data TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state);
CREATE TABLE IF NOT EXISTS ledger (id TEXT PRIMARY KEY, state TEXT NOT NULL, version INTEGER NOT NULL, data TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS checkpoints (job_id TEXT NOT NULL, id TEXT NOT NULL, data TEXT NOT NULL, PRIMARY KEY (job_id, id));
CREATE TABLE IF NOT EXISTS events (seq INTEGER PRIMARY KEY AUTOINCREMENT, job_id TEXT NOT NULL, data TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS events_job ON events(job_id);
CREATE TABLE IF NOT EXISTS seen_messages (id TEXT PRIMARY KEY, seen_at REAL NOT NULL);
CREATE INDEX IF NOT EXISTS seen_messages_by_time ON seen_messages (seen_at);
CREATE TABLE IF NOT EXISTS endpoints (recipient TEXT PRIMARY KEY, url TEXT NOT NULL);
"""
LOCK_WAIT_SECONDS = 10.0


def connect(path: Path, timeout: float = LOCK_WAIT_SECONDS) -> sqlite3.Connection:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    # every job's JDL and Environment are in it: 0600 before SQLite opens it (its -wal and -shm
    # files take the database's mode)
    os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600))
    os.chmod(path, 0o600)
    conn = sqlite3.connect(path, timeout=timeout, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.executescript(_SCHEMA)
    return conn


class Database:
    def __init__(self, path: Path) -> None:
        self._patient = connect(path)  # first: it creates the schema, waiting for it if need be
        self._at_once = connect(path, timeout=0.0)
        self._lock = threading.Lock()  # the loop's connection is also used by tests' other threads
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite-wait")

    def now(self, work: Work[T]) -> T:
        """On the caller's thread; raises OperationalError ("database is locked") rather than wait."""
        with self._lock:
            return work(self._at_once)

    async def run(self, work: Work[T]) -> T:
        """`work` (one statement, or statements each safe to run again) on the loop, or, while
        another process holds the lock, on the waiting thread."""
        try:
            return self.now(work)
        except sqlite3.OperationalError as exc:
            log.debug("sqlite.waiting", error=str(exc))  # the patient connection raises it again if it lasts
        return await asyncio.get_running_loop().run_in_executor(self._thread, work, self._patient)

    async def close(self) -> None:
        with self._lock:
            self._at_once.close()
        await asyncio.get_running_loop().run_in_executor(self._thread, self._patient.close)
        self._thread.shutdown(wait=False)
