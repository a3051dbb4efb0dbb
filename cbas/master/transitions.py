"""The transition core: every state change of a job goes through here.

`next_job` is pure: given a job and the change asked for, it returns the job as it is to be
written, or None when the change does not apply (the state machine forbids it, or the message
asking for it speaks for an attempt or a machine the job has left: fencing). `transition` applies
it through JobStore.mutate_job, a conditional write that records the event with the state (both
or neither), so a duplicated, late or reordered message changes nothing.

The part of the Master (cbas.master.service) every other part builds on.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Callable

import structlog

from cbas.backends import NotFound
from cbas.master.parts import MasterPart
from cbas.models import Job, JobEvent, utcnow
from cbas.state import JobState, can_transition

log = structlog.get_logger(__name__)

Update = Callable[[Job], dict[str, Any]]  # the fields a change sets besides the state, from the job before it


def next_job(job: Job, target: JobState, *, attempt: int | None, instance_id: str | None, now: datetime,
             update: Update | None = None) -> Job | None:
    """The job after moving to target at `now`, or None if it may not move.

    attempt / instance_id (None: not checked) are the fencing token of whoever asks: the change
    applies only if they are still the job's. Time spent RUNNING is summed into run_seconds when
    the job leaves RUNNING; `update` sees the job as it was and may override any field."""
    if not can_transition(job.state, target):
        return None
    if attempt is not None and job.attempt != attempt:
        return None
    if instance_id is not None and job.instance_id != instance_id:
        return None
    fields: dict[str, Any] = {"state": target}
    if job.state == JobState.RUNNING and job.running_since is not None:
        fields["run_seconds"] = job.run_seconds + (now - job.running_since).total_seconds()
        fields["running_since"] = None
    if target == JobState.RUNNING:
        fields["running_since"] = now
        if job.started_at is None:
            fields["started_at"] = now
    if target.is_terminal():
        fields["finished_at"] = now
    if update is not None:
        fields.update(update(job))
    return job.model_copy(update=fields)


class Transitions(MasterPart):
    """The Master's state changes, and the disk snapshots a job's end (or a newer one) frees."""

    async def transition(
        self, job_id: str, target: JobState, *, attempt: int | None = None,
        instance_id: str | None = None, event: str, detail: str = "",
        update: Update | None = None,
    ) -> Job | None:
        """Move a job to target if the state machine allows it and the message is current."""

        def change(job: Job) -> Job | None:  # mutate_job may call it again on a write conflict
            return next_job(job, target, attempt=attempt, instance_id=instance_id, now=utcnow(), update=update)

        try:  # the event in the same write: a master killed after it has both or neither
            new = await self.store.mutate_job(job_id, change, JobEvent(job_id=job_id, kind=event, detail=detail,
                                                                       state=target))
        except NotFound:
            log.warning("job.unknown", job_id=job_id, target=target)
            return None
        if new is None:
            log.info("job.transition_ignored", job_id=job_id, target=target, cause=event)
            return None
        log.info("job.state", job_id=job_id, state=new.state, cause=event, detail=detail)
        if target.is_terminal():
            await self.drop_snapshots(job_id, keep=0)
        return new

    async def drop_snapshots(self, job_id: str, keep: int) -> None:
        """Volume checkpoints: delete the disk snapshots beyond the newest `keep` good ones."""
        records = [c for c in await self.store.list_checkpoints(job_id) if c.snapshot_id]
        good = [c.id for c in records if not c.bad][-keep:] if keep else []
        for record in records:
            if record.id not in good and not record.snapshot_deleted:
                try:
                    await self.cloud.delete_snapshot(record.snapshot_id)  # type: ignore[arg-type]
                    await self.store.mark_snapshot_deleted(job_id, record.id)
                except Exception as exc:  # the reaper finds it again later
                    log.warning("snapshot.delete_failed", job_id=job_id, snapshot=record.snapshot_id, error=str(exc))
