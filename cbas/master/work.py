"""How much of a job's work is done, as a restart would find it: the work its newest checkpoint
holds, plus, while an attempt runs, the time since it resumed. Time spent running that no
checkpoint saved (lost to a preemption, or to a fall-back to an older checkpoint) is not
progress: a deadline reckoned from time spent RUNNING holds only in simulation. Pure.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from cbas.models import CheckpointRecord, Job
from cbas.state import JobState


def checkpointed_work(job: Job, record: CheckpointRecord) -> float | None:
    """The work a checkpoint of the job's running attempt holds: what the attempt resumed from,
    plus its running time until the capture began. None when that cannot be told (the attempt is
    not running, or is not the checkpoint's)."""
    if job.state != JobState.RUNNING or job.running_since is None or record.attempt != job.attempt:
        return None
    began = record.created_at - timedelta(seconds=record.pause_seconds + record.upload_seconds)
    return job.resumed_work_seconds + max(0.0, (began - job.running_since).total_seconds())


def work_done(job: Job, now: datetime) -> float:
    """Seconds of the job's work done at `now`, as far as a restart from now would keep them."""
    if job.state == JobState.RUNNING and job.running_since is not None:
        return job.resumed_work_seconds + max(0.0, (now - job.running_since).total_seconds())
    return job.saved_work_seconds


def resumed_from(records: list[CheckpointRecord]) -> float:
    """The work an attempt restoring records[0] starts from (records: newest first; none: a fresh
    start). A checkpoint whose work is not known (it came while its attempt was not running, or
    is from before work was recorded) holds at least what the newest older one known holds."""
    return next((r.work_seconds for r in records if r.work_seconds is not None), 0.0)
