"""The work a job has done is what a restart would find: time it ran that no checkpoint saved
(lost to a preemption) is not progress, or the scheduler's deadline guarantee holds only in
simulation. Pure rules (cbas.master.work), then through the master's real handlers."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from cbas.master.work import checkpointed_work, resumed_from, work_done
from cbas.messages import Ping
from cbas.models import CheckpointRecord, Job
from cbas.state import JobState
from tests.faults.test_message_chaos import INSTANCE, JDL, MemoryCloud, master_with_worker

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
HOUR = 3600.0


def record(job_id: str, attempt: int, at: datetime, n: int = 1) -> CheckpointRecord:
    return CheckpointRecord(job_id=job_id, id=f"a{attempt:04d}-n{n:05d}", attempt=attempt, manifest_key="k",
                            size_bytes=1, pause_seconds=1.0, upload_seconds=9.0, reason="interval", created_at=at)


def test_work_is_what_the_attempt_resumed_from_plus_its_running_time() -> None:
    job = Job(id="j", state=JobState.RUNNING, attempt=2, running_since=T0, resumed_work_seconds=100.0)
    assert work_done(job, T0 + timedelta(hours=1)) == 100.0 + HOUR
    # a checkpoint holds the work up to its capture (its pause and upload came after)
    assert checkpointed_work(job, record("j", 2, T0 + timedelta(hours=1))) == 100.0 + HOUR - 10.0
    assert checkpointed_work(job, record("j", 1, T0 + timedelta(hours=1))) is None  # an older attempt's


def test_a_job_not_running_has_done_what_its_newest_checkpoint_holds() -> None:
    job = Job(id="j", state=JobState.QUEUED, run_seconds=3 * HOUR, saved_work_seconds=HOUR)
    assert work_done(job, T0) == HOUR
    assert resumed_from([]) == 0.0  # a fresh start
    assert resumed_from([record("j", 1, T0)]) == 0.0  # a checkpoint from before work was recorded
    known = record("j", 1, T0).model_copy(update={"work_seconds": 500.0})
    late = record("j", 1, T0, n=2)  # came after its attempt stopped running: its work not known
    assert resumed_from([late, known]) == 500.0  # at least what the one before it holds, never 0


async def test_work_lost_to_a_preemption_is_not_progress(tmp_path: Path, aiohttp_client: Any) -> None:
    master, _, _ = await master_with_worker(tmp_path, aiohttp_client, MemoryCloud())
    try:
        job = await master.create_job("lost work")
        await master.add_job(job.id, JDL)
        await master.schedule()
        await master.worker_started(INSTANCE)
        await master.pinged(Ping(instance_id=INSTANCE, job_id=job.id, attempt=1, phase="running"))
        started = datetime.now(timezone.utc) - timedelta(hours=3)  # it has run for three hours ...
        await master.store.mutate_job(job.id, lambda j: j.model_copy(update={"running_since": started}))
        # ... and checkpointed once, an hour in
        await master.checkpoint_done(record(job.id, 1, started + timedelta(hours=1)), final=False,
                                     instance_id=INSTANCE)
        await master.machine_lost(job.id, INSTANCE, "lost without a notice")
        lost = await master.store.get_job(job.id)
        assert lost.state in (JobState.QUEUED, JobState.PROVISIONING) and lost.run_seconds >= 3 * HOUR
        assert abs(lost.saved_work_seconds - (HOUR - 10.0)) < 1.0, lost.saved_work_seconds
        assert abs(master.adapter.progress_hours(lost) - (HOUR - 10.0) / HOUR) < 0.001  # not three hours
        # the next attempt resumes from that checkpoint's work
        await master.schedule()
        again = await master.store.get_job(job.id)
        assert again.instance_id is not None
        await master.worker_started(again.instance_id)
        await master.pinged(Ping(instance_id=again.instance_id, job_id=job.id, attempt=2, phase="running",
                                 restored_from=record(job.id, 1, started).id))
        resumed = await master.store.get_job(job.id)
        assert resumed.state == JobState.RUNNING and abs(resumed.resumed_work_seconds - (HOUR - 10.0)) < 1.0
    finally:
        await master.bus.close()
        await master.store.close()
