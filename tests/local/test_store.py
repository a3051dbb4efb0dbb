import asyncio
from pathlib import Path

import pytest

from cbas.backends import NotFound, StaleWrite
from cbas.local.store import SqliteJobStore
from cbas.models import CheckpointRecord, Job, JobEvent, LedgerEntry, LedgerState
from cbas.state import JobState


@pytest.fixture
async def store(tmp_path: Path):
    store = SqliteJobStore(tmp_path / "cbas.db")
    yield store
    await store.close()
    await store.close()  # closing twice is safe


async def test_conditional_write_lets_only_one_writer_win(store: SqliteJobStore) -> None:
    job = await store.create_job(Job(id="j1"))
    first = await store.update_job(job.model_copy(update={"state": JobState.QUEUED}))
    assert first.version == 1
    with pytest.raises(StaleWrite):
        await store.update_job(job.model_copy(update={"state": JobState.CANCELLED}))
    assert (await store.get_job("j1")).state == JobState.QUEUED


async def test_create_refuses_an_existing_id_and_get_unknown_is_not_found(store: SqliteJobStore) -> None:
    await store.create_job(Job(id="j1"))
    with pytest.raises(StaleWrite):
        await store.create_job(Job(id="j1"))
    with pytest.raises(NotFound):
        await store.get_job("nope")


async def test_mutate_rereads_until_it_wins(store: SqliteJobStore, tmp_path: Path) -> None:
    await store.create_job(Job(id="j1"))
    other = SqliteJobStore(tmp_path / "cbas.db")  # a second connection, like another process
    calls = 0

    def bump(job: Job) -> Job:
        nonlocal calls
        calls += 1
        if calls == 1:  # another process writes between our read and our write
            stale = job.model_copy(update={"restarts": 10})
            other._execute(
                "UPDATE jobs SET version = version + 1, data = ? WHERE id = ?",
                (stale.model_copy(update={"version": job.version + 1}).model_dump_json(), job.id),
            )
        return job.model_copy(update={"restarts": job.restarts + 1})

    result = await store.mutate_job("j1", bump)
    assert calls == 2
    assert result is not None and result.restarts == 11
    assert await store.mutate_job("j1", lambda job: None) is None
    await other.close()


async def test_list_by_state_ledger_checkpoints_events(store: SqliteJobStore) -> None:
    await store.create_job(Job(id="a", state=JobState.QUEUED))
    await store.create_job(Job(id="b"))
    assert [j.id for j in await store.list_jobs({JobState.QUEUED})] == ["a"]

    entry = await store.put_ledger(LedgerEntry(id="l-1", job_id="a"))
    running = await store.put_ledger(entry.model_copy(update={"state": LedgerState.RUNNING, "instance_id": "i-1"}))
    with pytest.raises(StaleWrite):
        await store.put_ledger(entry.model_copy(update={"state": LedgerState.TERMINATED}))
    await store.put_ledger(running.model_copy(update={"state": LedgerState.TERMINATED}))
    assert await store.list_ledger() == []
    assert len(await store.list_ledger(live_only=False)) == 1

    record = CheckpointRecord(job_id="a", id="a0001-n00001", attempt=1, manifest_key="k", size_bytes=1,
                              pause_seconds=0.1, upload_seconds=0.1, reason="interval")
    assert await store.add_checkpoint(record)
    assert not await store.add_checkpoint(record)  # idempotent
    await store.mark_checkpoint_bad("a", record.id)
    assert (await store.list_checkpoints("a"))[0].bad

    await store.add_event(JobEvent(job_id="a", kind="queued"))
    assert [e.kind for e in await store.list_events("a")] == ["queued"]


async def test_message_ids_are_remembered_within_the_window(store: SqliteJobStore) -> None:
    assert await store.first_sighting("m1", window_seconds=60)
    assert not await store.first_sighting("m1", window_seconds=60)
    assert await store.seen("m1", window_seconds=60) and not await store.seen("m3", window_seconds=60)
    assert await store.first_sighting("m2", window_seconds=0)
    await asyncio.sleep(0.01)
    assert await store.first_sighting("m2", window_seconds=0.001)  # expired: seen anew
