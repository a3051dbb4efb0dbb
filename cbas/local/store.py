"""JobStore on SQLite (WAL). Records are JSON; state and version are columns for queries.
The loop never waits for another process's lock (cbas.local.database)."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Any

import structlog

from cbas.backends import JobMutation, NotFound, StaleWrite, mutate_with_retries
from cbas.local.database import Database
from cbas.models import CheckpointRecord, Job, JobEvent, LedgerEntry, LedgerState, utcnow
from cbas.state import JobState

log = structlog.get_logger(__name__)

SEEN_PRUNE_SECONDS = 10.0


Statement = tuple[str, tuple[object, ...]]


def _in_one_transaction(conn: sqlite3.Connection, condition: Statement, then: Statement) -> int:
    """`condition` (a conditional write), and `then` only if it changed a row, as one
    transaction: rows `condition` changed. Safe to run again: nothing stays of a try that failed."""
    conn.execute("BEGIN IMMEDIATE")  # the write lock first: "database is locked" here changes nothing
    try:
        changed = conn.execute(*condition).rowcount
        if changed == 1:
            conn.execute(*then)
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return changed


class SqliteJobStore:
    """Each query is a short local transaction; conditional writes use `WHERE version = ?`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._db = Database(path)
        self._closed = False
        self._pruned_at = 0.0

    def _execute(self, sql: str, params: tuple[object, ...] = ()) -> sqlite3.Cursor:
        return self._db.now(lambda conn: conn.execute(sql, params))

    async def _query(self, sql: str, params: tuple[object, ...] = ()) -> list[Any]:
        return await self._db.run(lambda conn: conn.execute(sql, params).fetchall())

    async def _change(self, sql: str, params: tuple[object, ...] = ()) -> int:
        """Rows changed."""
        return await self._db.run(lambda conn: conn.execute(sql, params).rowcount)

    async def create_job(self, job: Job) -> Job:
        try:
            await self._change("INSERT INTO jobs (id, state, version, data) VALUES (?, ?, ?, ?)",
                               (job.id, job.state.value, job.version, job.model_dump_json()))
        except sqlite3.IntegrityError:
            raise StaleWrite(f"job {job.id} exists already") from None
        return job

    async def get_job(self, job_id: str) -> Job:
        rows = await self._query("SELECT data FROM jobs WHERE id = ?", (job_id,))
        if not rows:
            raise NotFound(f"job {job_id}")
        return Job.model_validate_json(rows[0][0])

    async def list_jobs(self, states: set[JobState] | None = None) -> list[Job]:
        jobs = [Job.model_validate_json(row[0]) for row in await self._query("SELECT data FROM jobs ORDER BY rowid")]
        return [job for job in jobs if states is None or job.state in states]

    async def update_job(self, job: Job, event: JobEvent | None = None) -> Job:
        new = job.model_copy(update={"version": job.version + 1, "updated_at": utcnow()})
        update = ("UPDATE jobs SET state = ?, version = ?, data = ? WHERE id = ? AND version = ?",
                  (new.state.value, new.version, new.model_dump_json(), job.id, job.version))
        if event is None:
            changed = await self._change(*update)
        else:
            changed = await self._db.run(lambda conn: _in_one_transaction(conn, update, (
                "INSERT INTO events (job_id, data) VALUES (?, ?)", (event.job_id, event.model_dump_json()))))
        if changed != 1:
            raise StaleWrite(f"job {job.id} changed since version {job.version}")
        return new

    async def mutate_job(self, job_id: str, change: JobMutation, event: JobEvent | None = None) -> Job | None:
        return await mutate_with_retries(self, job_id, change, event)

    async def put_ledger(self, entry: LedgerEntry) -> LedgerEntry:
        new = entry.model_copy(update={"version": entry.version + 1})
        if entry.version == 0:
            try:
                await self._change("INSERT INTO ledger (id, state, version, data) VALUES (?, ?, ?, ?)",
                                   (new.id, new.state.value, new.version, new.model_dump_json()))
            except sqlite3.IntegrityError:
                raise StaleWrite(f"ledger entry {entry.id} exists already") from None
            return new
        changed = await self._change("UPDATE ledger SET state = ?, version = ?, data = ? WHERE id = ? AND version = ?",
                                     (new.state.value, new.version, new.model_dump_json(), entry.id, entry.version))
        if changed != 1:
            raise StaleWrite(f"ledger entry {entry.id} changed since version {entry.version}")
        return new

    async def list_ledger(self, live_only: bool = True) -> list[LedgerEntry]:
        sql = "SELECT data FROM ledger"
        params: tuple[object, ...] = ()
        if live_only:
            sql += " WHERE state != ?"
            params = (LedgerState.TERMINATED.value,)
        return [LedgerEntry.model_validate_json(row[0]) for row in await self._query(sql + " ORDER BY rowid", params)]

    async def add_checkpoint(self, record: CheckpointRecord) -> bool:
        changed = await self._change("INSERT OR IGNORE INTO checkpoints (job_id, id, data) VALUES (?, ?, ?)",
                                     (record.job_id, record.id, record.model_dump_json()))
        return changed == 1

    async def list_checkpoints(self, job_id: str) -> list[CheckpointRecord]:
        rows = await self._query("SELECT data FROM checkpoints WHERE job_id = ? ORDER BY id", (job_id,))
        return [CheckpointRecord.model_validate_json(row[0]) for row in rows]

    async def mark_checkpoint_bad(self, job_id: str, checkpoint_id: str) -> None:
        await self._mark_checkpoint(job_id, checkpoint_id, bad=True)

    async def mark_snapshot_deleted(self, job_id: str, checkpoint_id: str) -> None:
        await self._mark_checkpoint(job_id, checkpoint_id, snapshot_deleted=True)

    async def _mark_checkpoint(self, job_id: str, checkpoint_id: str, **fields: bool) -> None:
        for record in await self.list_checkpoints(job_id):
            if record.id == checkpoint_id:
                marked = record.model_copy(update=fields)
                await self._change("UPDATE checkpoints SET data = ? WHERE job_id = ? AND id = ?",
                                   (marked.model_dump_json(), job_id, checkpoint_id))

    async def add_event(self, event: JobEvent) -> None:
        await self._change("INSERT INTO events (job_id, data) VALUES (?, ?)", (event.job_id, event.model_dump_json()))

    async def list_events(self, job_id: str) -> list[JobEvent]:
        rows = await self._query("SELECT data FROM events WHERE job_id = ? ORDER BY seq", (job_id,))
        return [JobEvent.model_validate_json(row[0]) for row in rows]

    async def first_sighting(self, message_id: str, window_seconds: float) -> bool:
        now = time.time()
        return await self._db.run(lambda conn: self._first_sighting(conn, message_id, window_seconds, now))

    def _first_sighting(self, conn: sqlite3.Connection, message_id: str, window_seconds: float, now: float) -> bool:
        # each statement may run again on the waiting connection (the prune and the insert are
        # idempotent, the update is conditional)
        if now - self._pruned_at > SEEN_PRUNE_SECONDS:  # not on every message: it is the hot path
            conn.execute("DELETE FROM seen_messages WHERE seen_at < ?", (now - window_seconds,))
            self._pruned_at = now
        cursor = conn.execute("INSERT OR IGNORE INTO seen_messages (id, seen_at) VALUES (?, ?)", (message_id, now))
        if cursor.rowcount == 1:
            return True
        # seen before: a sighting older than the window (not yet pruned) counts as none
        cursor = conn.execute("UPDATE seen_messages SET seen_at = ? WHERE id = ? AND seen_at < ?",
                              (now, message_id, now - window_seconds))
        return cursor.rowcount == 1

    async def seen(self, message_id: str, window_seconds: float) -> bool:
        rows = await self._query("SELECT seen_at FROM seen_messages WHERE id = ?", (message_id,))
        return bool(rows) and rows[0][0] >= time.time() - window_seconds

    async def close(self) -> None:
        if not self._closed:
            self._closed = True
            await self._db.close()
