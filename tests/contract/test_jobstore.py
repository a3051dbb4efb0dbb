"""One contract for every JobStore: the local SQLite one and DynamoDB (on moto)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import boto3
import pytest
from moto import mock_aws

from cbas.aws.dynamodb import DynamoJobStore
from cbas.backends import NotFound, StaleWrite
from cbas.local.store import SqliteJobStore
from cbas.models import CheckpointRecord, Job, JobEvent, LedgerEntry, LedgerState
from cbas.state import JobState


@pytest.fixture(params=["sqlite", "dynamodb"])
async def store(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    if request.param == "sqlite":
        store = SqliteJobStore(tmp_path / "cbas.db")
        yield store
        await store.close()
        return
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    with mock_aws():
        yield DynamoJobStore("cbas-test", boto3.resource("dynamodb", region_name="us-east-1"))


async def test_create_get_and_unknown(store) -> None:  # type: ignore[no-untyped-def]
    await store.create_job(Job(id="j1", name="one"))
    assert (await store.get_job("j1")).name == "one"
    with pytest.raises(StaleWrite):
        await store.create_job(Job(id="j1"))
    with pytest.raises(NotFound):
        await store.get_job("nope")


async def test_only_one_of_two_writers_wins(store) -> None:  # type: ignore[no-untyped-def]
    job = await store.create_job(Job(id="j1"))
    assert (await store.update_job(job.model_copy(update={"state": JobState.QUEUED}))).version == 1
    with pytest.raises(StaleWrite):
        await store.update_job(job.model_copy(update={"state": JobState.CANCELLED}))
    assert (await store.get_job("j1")).state == JobState.QUEUED


async def test_concurrent_mutations_all_land(store) -> None:  # type: ignore[no-untyped-def]
    await store.create_job(Job(id="j1"))

    async def bump() -> None:
        await store.mutate_job("j1", lambda job: job.model_copy(update={"restarts": job.restarts + 1}))

    await asyncio.gather(*(bump() for _ in range(8)))
    job = await store.get_job("j1")
    assert job.restarts == 8 and job.version == 8


async def test_a_state_and_its_event_land_together_or_not_at_all(store) -> None:  # type: ignore[no-untyped-def]
    job = await store.create_job(Job(id="j1"))
    queued = await store.update_job(job.model_copy(update={"state": JobState.QUEUED}),
                                    JobEvent(job_id="j1", kind="queued", state=JobState.QUEUED))
    with pytest.raises(StaleWrite):  # a writer that lost: its event is not written either
        await store.update_job(job.model_copy(update={"state": JobState.CANCELLED}),
                               JobEvent(job_id="j1", kind="cancelled", state=JobState.CANCELLED))
    await store.mutate_job("j1", lambda j: j.model_copy(update={"state": JobState.PROVISIONING}),
                           JobEvent(job_id="j1", kind="provisioning", state=JobState.PROVISIONING))
    await store.mutate_job("j1", lambda j: None, JobEvent(job_id="j1", kind="declined"))  # no change, no event
    assert [(e.kind, e.state) for e in await store.list_events("j1")] == [
        ("queued", JobState.QUEUED), ("provisioning", JobState.PROVISIONING)]
    assert (await store.get_job("j1")).version == queued.version + 1


async def test_concurrent_mutations_with_events_all_land_each_with_its_event(store) -> None:  # type: ignore[no-untyped-def]
    await store.create_job(Job(id="j1"))

    async def bump(n: int) -> None:
        await store.mutate_job("j1", lambda job: job.model_copy(update={"restarts": job.restarts + 1}),
                               JobEvent(job_id="j1", kind=f"bump-{n}"))

    await asyncio.gather(*(bump(n) for n in range(6)))
    assert (await store.get_job("j1")).restarts == 6
    assert sorted(e.kind for e in await store.list_events("j1")) == [f"bump-{n}" for n in range(6)]


async def test_queries_by_state(store) -> None:  # type: ignore[no-untyped-def]
    await store.create_job(Job(id="a", state=JobState.QUEUED))
    await store.create_job(Job(id="b", state=JobState.RUNNING))
    await store.create_job(Job(id="c", state=JobState.QUEUED))
    assert sorted(j.id for j in await store.list_jobs({JobState.QUEUED})) == ["a", "c"]
    assert sorted(j.id for j in await store.list_jobs()) == ["a", "b", "c"]
    queued = await store.get_job("a")
    await store.update_job(queued.model_copy(update={"state": JobState.PROVISIONING}))
    assert [j.id for j in await store.list_jobs({JobState.QUEUED})] == ["c"]


async def test_ledger(store) -> None:  # type: ignore[no-untyped-def]
    entry = await store.put_ledger(LedgerEntry(id="l-1", job_id="a"))
    with pytest.raises(StaleWrite):
        await store.put_ledger(LedgerEntry(id="l-1", job_id="a"))
    running = await store.put_ledger(entry.model_copy(update={"state": LedgerState.RUNNING, "instance_id": "i-1"}))
    with pytest.raises(StaleWrite):
        await store.put_ledger(entry.model_copy(update={"state": LedgerState.TERMINATED}))
    assert [e.instance_id for e in await store.list_ledger()] == ["i-1"]
    await store.put_ledger(running.model_copy(update={"state": LedgerState.TERMINATED}))
    assert await store.list_ledger() == []
    assert [e.id for e in await store.list_ledger(live_only=False)] == ["l-1"]


async def test_checkpoints_and_events(store) -> None:  # type: ignore[no-untyped-def]
    for number in (2, 1):
        record = CheckpointRecord(job_id="a", id=f"a0001-n0000{number}", attempt=1, manifest_key="k", size_bytes=1,
                                  pause_seconds=0.1, upload_seconds=0.1, reason="interval")
        assert await store.add_checkpoint(record)
        assert not await store.add_checkpoint(record)
    await store.mark_checkpoint_bad("a", "a0001-n00002")
    assert [(c.id, c.bad) for c in await store.list_checkpoints("a")] == [("a0001-n00001", False), ("a0001-n00002", True)]
    await store.mark_snapshot_deleted("a", "a0001-n00002")  # both marks stay
    await store.mark_snapshot_deleted("a", "a0001-n00009")  # none such: nothing happens
    assert [(c.id, c.bad, c.snapshot_deleted) for c in await store.list_checkpoints("a")] == [
        ("a0001-n00001", False, False), ("a0001-n00002", True, True)]
    for kind in ("queued", "provisioning", "running"):
        await store.add_event(JobEvent(job_id="a", kind=kind))
    assert [e.kind for e in await store.list_events("a")] == ["queued", "provisioning", "running"]
    assert await store.list_events("b") == []


async def test_message_ids_within_a_window(store) -> None:  # type: ignore[no-untyped-def]
    assert await store.first_sighting("m1", 60)
    assert not await store.first_sighting("m1", 60)
    assert await store.seen("m1", 60) and not await store.seen("m3", 60)
    assert await store.first_sighting("m2", 0.001)
    await asyncio.sleep(0.01)
    assert await store.first_sighting("m2", 0.001)


async def test_a_stale_state_index_never_shows_an_old_state(store) -> None:  # type: ignore[no-untyped-def]
    entry = await store.put_ledger(LedgerEntry(id="l-9", job_id="a"))
    entry = await store.put_ledger(entry.model_copy(update={"state": LedgerState.RUNNING}))
    await store.put_ledger(entry.model_copy(update={"state": LedgerState.TERMINATED}))
    if isinstance(store, DynamoJobStore):  # make the index lag, as DynamoDB's may
        original = store._query_index

        def lagging(state_pk: str) -> list[dict]:  # type: ignore[type-arg]
            hits = original(state_pk)
            if state_pk == "LEDGERSTATE#RUNNING":
                hits += original("LEDGERSTATE#TERMINATED")  # the old entry is still indexed as RUNNING
            return hits

        store._query_index = lagging  # type: ignore[method-assign]
    assert await store.list_ledger() == []
    assert [e.state for e in await store.list_ledger(live_only=False)] == [LedgerState.TERMINATED]
